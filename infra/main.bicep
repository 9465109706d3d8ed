// The partner token broker in one resource group: a Python 3.11 Function App on the Flex Consumption plan,
// its storage account, the Key Vault holding the multi-tenant app's credential, a user-assigned managed
// identity that reaches both, and Log Analytics + Application Insights.
//
// Deploy with `azd up` (azure.yaml, main.parameters.json) or `az deployment sub create` (docs/deploy.md).
// Modules are local files on purpose: checkov cannot scan registry modules (`br/public:`), and
// `make lint` scans everything here offline (infra/validate.py).

targetScope = 'subscription'

@minLength(1)
@maxLength(40)
@description('Environment name (azd AZURE_ENV_NAME); seeds the resource names.')
param environmentName string

@minLength(1)
@description('Region of every resource; it must offer the Flex Consumption plan.')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Resource group to create or reuse; empty: rg-<environmentName>.')
param resourceGroupName string = ''

// GUIDs: ARM checks the length before it creates anything, so an empty or truncated value fails the deployment
// up front instead of deploying an app that refuses to start; the broker checks the full GUID form at start.
@minLength(36)
@maxLength(36)
@description('Client ID (GUID) of the multi-tenant app registration the broker issues tokens as (docs/app-registration.md).')
param brokerClientId string

@allowed([
  'secret'
  'certificate'
  'federated'
])
@description('How the broker proves the app\'s identity to Entra ID (docs/credentials.md).')
param credentialMode string = 'secret'

@minLength(36)
@maxLength(36)
@description('Home tenant (GUID) of the internal callers; by default the tenant of this deployment.')
param callerTenantId string = subscription().tenantId

@description('Audience of the callers\' tokens; empty: api://<brokerClientId>.')
param callerAudience string = ''

@description('CALLER_POLICY as an object (broker/policy.py): which caller may have which tenants and scopes. Empty: nobody (deny by default).')
param callerPolicy object = {}

@minLength(1)
@maxLength(127)
@description('Key Vault certificate the broker presents in `certificate` mode; switching names is how a renewed certificate goes live (docs/credentials.md).')
param clientCertificateName string = 'broker-client-certificate'

@description('NCRONTAB schedule of the incident prefetch timer (six fields, UTC).')
param incidentSyncSchedule string = '0 */5 * * * *'

@description('Queue carrying one sync message per tenant.')
param incidentSyncQueue string = 'incident-sync'

@description('Upper bound of Flex Consumption instances (the plan accepts 40 to 1000).')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@allowed([
  512
  2048
  4096
])
@description('Memory of each Flex Consumption instance, in MB.')
param instanceMemoryMB int = 2048

@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
])
@description('Storage replication; Standard_LRS only where the region has no availability zones.')
param storageSkuName string = 'Standard_ZRS'

@description('More app settings as name: string value, for the broker\'s optional settings (docs/deploy.md). A name this template sets itself is ignored: the template\'s value wins.')
param extraAppSettings object = {}

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
}
// The broker's name (AZURE_CLOUD, broker/clouds.py) for the cloud this deployment runs in; a cloud not
// listed fails the deployment rather than deploying a broker that talks to another cloud's hosts.
var brokerClouds = {
  AzureCloud: 'public'
  AzureUSGovernment: 'usgovernment'
  AzureChinaCloud: 'china'
}

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: empty(resourceGroupName) ? 'rg-${environmentName}' : resourceGroupName
  location: location
  tags: tags
}

module identity 'modules/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: 'id-broker-${resourceToken}'
    location: location
    tags: tags
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    workspaceName: 'log-${resourceToken}'
    appInsightsName: 'appi-${resourceToken}'
    location: location
    tags: tags
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: 'st${resourceToken}'
    location: location
    tags: tags
    skuName: storageSkuName
    deploymentContainerName: 'app-package-${resourceToken}'
    queueNames: [
      incidentSyncQueue
    ]
  }
}

module vault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  scope: rg
  params: {
    name: 'kv-${resourceToken}'
    location: location
    tags: tags
  }
}

module roles 'modules/role-assignments.bicep' = {
  name: 'role-assignments'
  scope: rg
  params: {
    principalId: identity.outputs.principalId
    storageAccountName: storage.outputs.name
    keyVaultName: vault.outputs.name
    appInsightsName: monitoring.outputs.appInsightsName
  }
}

module app 'modules/function-app.bicep' = {
  name: 'function-app'
  scope: rg
  dependsOn: [
    roles
  ]
  params: {
    name: 'func-broker-${resourceToken}'
    planName: 'plan-${resourceToken}'
    location: location
    tags: tags
    serviceName: 'broker'
    identityId: identity.outputs.id
    deploymentContainerUrl: '${storage.outputs.blobEndpoint}${storage.outputs.deploymentContainerName}'
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    // extraAppSettings first: union() lets the later object win, so nothing in it can override a setting
    // below (CALLER_AUTH above all).
    appSettings: union(extraAppSettings, {
      // The Functions host: identity-based AzureWebJobsStorage through the user-assigned identity. Service
      // URIs rather than the account name, whose endpoints the host (and the broker) would assume to be in
      // the public cloud; environment() gives this cloud's storage suffix.
      AzureWebJobsStorage__blobServiceUri: 'https://${storage.outputs.name}.blob.${environment().suffixes.storage}'
      AzureWebJobsStorage__queueServiceUri: 'https://${storage.outputs.name}.queue.${environment().suffixes.storage}'
      AzureWebJobsStorage__tableServiceUri: 'https://${storage.outputs.name}.table.${environment().suffixes.storage}'
      AzureWebJobsStorage__credential: 'managedidentity'
      AzureWebJobsStorage__clientId: identity.outputs.clientId
      APPLICATIONINSIGHTS_CONNECTION_STRING: monitoring.outputs.connectionString
      APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'Authorization=AAD;ClientId=${identity.outputs.clientId}'
      // The broker (broker/settings.py; the rest keep their defaults, see docs/deploy.md).
      AZURE_CLOUD: brokerClouds[environment().name]
      BROKER_CLIENT_ID: brokerClientId
      KEY_VAULT_URL: vault.outputs.uri
      CLIENT_CREDENTIAL_MODE: credentialMode
      CLIENT_CERTIFICATE_NAME: clientCertificateName
      MANAGED_IDENTITY_CLIENT_ID: identity.outputs.clientId
      CALLER_AUTH: 'entra'
      CALLER_TENANT_ID: callerTenantId
      CALLER_AUDIENCE: empty(callerAudience) ? 'api://${brokerClientId}' : callerAudience
      CALLER_POLICY: empty(callerPolicy) ? '' : string(callerPolicy)
      AUDIT_MODE: 'strict'
      // Resolved by the host from app settings (%INCIDENT_SYNC_SCHEDULE%, %INCIDENT_SYNC_QUEUE%) before
      // any Python runs, so they must be set here even where the broker has a default.
      INCIDENT_SYNC_SCHEDULE: incidentSyncSchedule
      INCIDENT_SYNC_QUEUE: incidentSyncQueue
    })
  }
}

output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = app.outputs.name
output BROKER_URL string = 'https://${app.outputs.defaultHostName}'
// Register this on the app registration as a web redirect URI (docs/app-registration.md); the broker derives
// the same value from WEBSITE_HOSTNAME, and the CLI from this output in the azd environment.
output CONSENT_REDIRECT_URI string = 'https://${app.outputs.defaultHostName}/api/consent/callback'
output KEY_VAULT_NAME string = vault.outputs.name
output KEY_VAULT_URL string = vault.outputs.uri
output STORAGE_ACCOUNT_NAME string = storage.outputs.name
output MANAGED_IDENTITY_CLIENT_ID string = identity.outputs.clientId
output MANAGED_IDENTITY_PRINCIPAL_ID string = identity.outputs.principalId

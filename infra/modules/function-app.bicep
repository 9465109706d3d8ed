// The broker: one Python 3.11 Function App on its own Flex Consumption plan, running as the user-assigned
// identity. Flex Consumption takes the runtime from functionAppConfig, not from app settings: the classic
// FUNCTIONS_WORKER_RUNTIME, FUNCTIONS_EXTENSION_VERSION and WEBSITE_RUN_FROM_PACKAGE must not be set.

param name string
param planName string
param location string
param tags object = {}

@description('The azd service this app is (azure.yaml): azd finds the app by this tag, which only the site carries.')
param serviceName string

@description('Resource ID of the user-assigned identity the app runs as.')
param identityId string

@description('URL of the blob container holding the deployment package.')
param deploymentContainerUrl string

param maximumInstanceCount int = 40
param instanceMemoryMB int = 2048

@description('App settings, as name: value.')
param appSettings object

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: union(tags, {
    'azd-service-name': serviceName
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: false
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: deploymentContainerUrl
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
    // No ftpsState: Flex Consumption has no FTP(S) and ARM rejects the property there (it is on the plan's
    // list of unsupported site properties); FTP publishing is refused by the `ftp` policy below as well.
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      http20Enabled: true
    }
  }
}

resource settings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: site
  name: 'appsettings'
  properties: appSettings
}

// Deployments (azd, az functionapp deployment, Core Tools) authenticate with Entra ID; no publishing
// user names and passwords. Each policy carries the site's location: ARM has rejected these child resources
// without one (the Azure Verified Module for sites sets it for that reason).
resource ftpCredentials 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'ftp'
  location: location
  properties: {
    allow: false
  }
}

resource scmCredentials 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'scm'
  location: location
  properties: {
    allow: false
  }
}

output id string = site.id
output name string = site.name
output defaultHostName string = site.properties.defaultHostName

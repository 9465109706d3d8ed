// The only roles the broker's managed identity holds, each on the narrowest scope that works.
// (Comments sit above the resources: pycep-parser 0.5.1, which checkov uses, rejects long comment runs
// inside an object.)

param principalId string
param storageAccountName string
param keyVaultName string
param appInsightsName string

// Built-in role definition IDs (the same in every Azure cloud).
var roles = {
  keyVaultSecretsUser: '4633458b-17de-408a-b874-0445c86b69e6'
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
}

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

// Key Vault Secrets User, on the vault only: read secret values, i.e. the client secret, or the private key
// of a certificate, which Key Vault exposes as the secret of the same name. It cannot list keys, write or
// delete. Unused in `federated` mode, where the broker reads nothing from the vault.
resource secretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, principalId, roles.keyVaultSecretsUser)
  scope: vault
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsUser)
  }
}

// Storage Blob Data Owner, on the account: the Functions host creates blob containers for its keys, the
// timer schedule monitor and the singleton locks (the timer runs on one instance only) and takes leases;
// Flex Consumption reads the deployment package from its container with this identity; the broker keeps
// incident blobs. Owner rather than Contributor because that is the role Microsoft documents for
// identity-based AzureWebJobsStorage ("Connecting to host storage with an identity").
resource blobOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(account.id, principalId, roles.storageBlobDataOwner)
  scope: account
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataOwner)
  }
}

// Storage Queue Data Contributor, on the account: the timer enqueues one sync message per tenant, the queue
// trigger reads and deletes them, and the host creates the `-poison` queue and moves failed messages there.
resource queueContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(account.id, principalId, roles.storageQueueDataContributor)
  scope: account
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataContributor)
  }
}

// Storage Table Data Contributor, on the account: the broker creates and writes its tables (tenants,
// checkpoints, incidents, audit records).
resource tableContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(account.id, principalId, roles.storageTableDataContributor)
  scope: account
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageTableDataContributor)
  }
}

// Monitoring Metrics Publisher, on the Application Insights component only: the component has local
// authentication disabled, so the host's telemetry is accepted only with an Entra ID token of this identity.
resource telemetryPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, principalId, roles.monitoringMetricsPublisher)
  scope: appInsights
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)
  }
}

// The user-assigned managed identity the Function App runs as. It reads the app credential from Key Vault,
// is the host's AzureWebJobsStorage credential, authenticates Flex deployments, and in `federated` mode is
// the multi-tenant app's credential itself (docs/credentials.md). User-assigned rather than system-assigned
// so that its roles and the app registration's federated credential exist before the app does and survive
// recreating it.

param name string
param location string
param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
output clientId string = identity.properties.clientId
output principalId string = identity.properties.principalId

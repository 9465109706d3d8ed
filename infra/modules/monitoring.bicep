// Log Analytics workspace and a workspace-based Application Insights component. The Functions host and the
// broker's `key=value` log lines land in the `traces` table (queries: docs/operations.md).
// Local authentication is off: the component accepts telemetry only from Entra ID principals holding
// Monitoring Metrics Publisher on it (the app's identity, modules/role-assignments.bicep), which the host
// uses through APPLICATIONINSIGHTS_AUTHENTICATION_STRING. The instrumentation key in the connection string
// is then an address, not a credential. An exporter inside the app (OpenTelemetry) must authenticate as the
// same identity (a ManagedIdentityCredential for MANAGED_IDENTITY_CLIENT_ID), or its telemetry is refused.

param workspaceName string
param appInsightsName string
param location string
param tags object = {}

@minValue(30)
@maxValue(730)
param retentionInDays int = 90

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: workspaceName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: retentionInDays
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    RetentionInDays: retentionInDays
    DisableLocalAuth: true
  }
}

output connectionString string = appInsights.properties.ConnectionString
output appInsightsName string = appInsights.name
output appInsightsId string = appInsights.id
output workspaceId string = workspace.id

// An Azure Monitor workbook over the app's structured logs, linked to Application Insights so it
// shows under Application Insights → Monitoring → Workbooks. Its content is workbook.json (the
// workbook's "Gallery Template" JSON, as the portal's Advanced Editor shows it); every query in it
// uses only the events and dimensions the app logs (tests/test_telemetry.py checks that).
param location string = resourceGroup().location
param tags object = {}
param applicationInsightsName string

@description('Name of the workbook in the gallery.')
param displayName string = 'Bookings invoicing'

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

// workbook.json names its resource with a placeholder: the queries run against it when the
// workbook is opened outside Application Insights (fallbackResourceIds).
var serializedData = replace(loadTextContent('workbook.json'), '__APPLICATION_INSIGHTS_ID__', applicationInsights.id)

// Its name is stable, so the same workbook is updated on every `azd provision`, never duplicated;
// its sourceId is the resource it belongs to, in lower case as the service keeps resource ids.
resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(resourceGroup().id, applicationInsights.id, 'bookings-invoicing-workbook')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: displayName
    category: 'workbook'
    sourceId: toLower(applicationInsights.id)
    serializedData: serializedData
    version: 'Notebook/1.0'
  }
}

output id string = workbook.id
output portalUrl string = '${environment().portal}/#@${tenant().tenantId}/resource${workbook.id}/workbook'

// Log alerts on the app's structured logs (Python `logging` with extra={...} → customDimensions),
// evaluated against Application Insights. the README Operate section says what each one means and what to do.
param location string = resourceGroup().location
param tags object = {}
param resourceToken string
param applicationInsightsName string

@description('E-mail address notified by the action group. Empty: no action group; alerts only show in Monitor → Alerts.')
param alertEmail string = ''

@description('Window without a finished sync run after which "sync stalled" fires.')
param syncStalledAfter string = 'PT1H'

var abbrs = loadJsonContent('../abbreviations.json')

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmail)) {
  name: '${abbrs.insightsActionGroups}bookings-${resourceToken}'
  location: 'global'
  tags: tags
  properties: {
    enabled: true
    groupShortName: 'bookings'
    emailReceivers: [
      {
        name: 'operator'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

// A sync run that could not read one or more businesses (partial) or any (failed).
var syncFailedQuery = '''
traces
| where tostring(customDimensions.event) == "sync_run_finished"
| where tostring(customDimensions.outcome) in ("failed", "partial")
'''

// A message moved to a poison queue, whether the app moved it (message_poisoned) or the host did
// after maxDequeueCount failed attempts.
var poisonQuery = '''
traces
| where tostring(customDimensions.event) == "message_poisoned"
    or (message has "MaxDequeueCount"
        and message has_any ("directory-upserts-poison", "invoice-jobs-poison", "sync-requests-poison", "sync-businesses-poison"))
'''

// Part of an invoicing job (one customer's invoice) failed; its bookings stay uninvoiced.
var invoiceFailedQuery = '''
traces
| where tostring(customDimensions.event) == "invoice_job_part_failed"
'''

// No sync run finished at all: the app is stopped, failed to start, or cannot reach its storage.
var syncStalledQuery = '''
traces
| where tostring(customDimensions.event) == "sync_run_finished"
'''

var rules = [
  {
    name: 'sync-failed'
    displayName: 'Bookings sync failed or partial'
    description: 'A sync run ended failed or partial: at least one Bookings business was not read. Stored bookings of that business are unchanged. See the README Operate section.'
    severity: 2
    query: syncFailedQuery
    operator: 'GreaterThan'
    threshold: 0
    evaluationFrequency: 'PT15M'
    windowSize: 'PT15M'
    autoMitigate: false
  }
  {
    name: 'message-poisoned'
    displayName: 'Message moved to a poison queue'
    description: 'A queue message (directory-upserts, invoice-jobs, sync-requests or sync-businesses) failed repeatedly and now waits in <queue>-poison. See the README Operate section.'
    severity: 1
    query: poisonQuery
    operator: 'GreaterThan'
    threshold: 0
    evaluationFrequency: 'PT15M'
    windowSize: 'PT15M'
    autoMitigate: false
  }
  {
    name: 'invoice-job-part-failed'
    displayName: 'Invoice job part failed'
    description: 'An invoicing job could not create one or more draft invoices; those bookings stay uninvoiced. See the README Operate section.'
    severity: 2
    query: invoiceFailedQuery
    operator: 'GreaterThan'
    threshold: 0
    evaluationFrequency: 'PT15M'
    windowSize: 'PT15M'
    autoMitigate: false
  }
  {
    name: 'sync-stalled'
    displayName: 'Bookings sync stalled'
    description: 'No sync run finished within ${syncStalledAfter}. See the README Operate section.'
    severity: 1
    query: syncStalledQuery
    operator: 'LessThan'
    threshold: 1
    evaluationFrequency: 'PT15M'
    windowSize: syncStalledAfter
    autoMitigate: true
  }
]

resource rule 'Microsoft.Insights/scheduledQueryRules@2023-03-15-preview' = [
  for r in rules: {
    name: '${abbrs.insightsScheduledQueryRules}${r.name}-${resourceToken}'
    location: location
    tags: tags
    kind: 'LogAlert'
    properties: {
      displayName: r.displayName
      description: r.description
      severity: r.severity
      enabled: true
      scopes: [
        applicationInsights.id
      ]
      evaluationFrequency: r.evaluationFrequency
      windowSize: r.windowSize
      criteria: {
        allOf: [
          {
            query: r.query
            timeAggregation: 'Count'
            operator: r.operator
            threshold: r.threshold
            failingPeriods: {
              numberOfEvaluationPeriods: 1
              minFailingPeriodsToAlert: 1
            }
          }
        ]
      }
      autoMitigate: r.autoMitigate
      actions: {
        actionGroups: empty(alertEmail) ? [] : [
          actionGroup.id
        ]
      }
    }
  }
]

// The function app: Flex Consumption, Python, one user-assigned identity for everything.
param name string
param location string = resourceGroup().location
param tags object = {}
param appServicePlanId string
param storageAccountName string
param deploymentStorageContainerName string
param applicationInsightsName string
param identityId string
param identityClientId string
param serviceName string = 'api'
param runtimeVersion string = '3.11'
param instanceMemoryMB int = 2048
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Versionless URI of the Key Vault secret holding AZURE_CLIENT_SECRET. Empty: the setting is not set, and the app signs in with the managed identity\'s client assertion instead (AZURE_FEDERATED_IDENTITY_CLIENT_ID).')
param clientSecretUri string = ''

// Values of the app's own settings (main.bicep documents each one).
param entraTenantId string
param entraClientId string
param authorityHost string
param graphBaseUrl string
param bcBaseUrl string
param bcEnvironment string
param bcCompanyId string
param bookingsBusinessIds string
param syncSchedule string
param syncLookbackDays string
param syncLookaheadDays string
param syncCustomers string
param syncItems string
param customerTemplate string
param itemTemplate string
param invoiceFreeBookings string
param writeBackToBookings string
param bookingsTimeZone string
param httpTimeoutSeconds string
param bcExecutionLimitSeconds string
param bcQueueTimeoutSeconds string
param bcWebClientUrl string
param pagesAllowedRole string
param pagesAllowGuests string
param pagesRedirectUri string
param pushCustomersToBookings string
param pushItemsToBookings string
param bcCustomerFilter string
param bcItemFilter string
param businessCompanies string
param invoiceDimensions string
param billingPeriod string
param billingSchedule string

resource stg 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

// The sign-in redirect URI of the operator pages on the app's default host name (a custom domain:
// set pagesRedirectUri).
var defaultRedirectUri = 'https://${name}.azurewebsites.net/api/pages/signin/callback'

// Every setting the app reads (shared/settings.py setting_names()). AzureWebJobsStorage itself is
// not set: the identity-based __accountName/__clientId pair replaces the connection string, for
// the host's triggers and for the app's table and queue clients alike. An empty ENTRA_TENANT_ID
// (set, but to nothing) means the deployment's tenant too. The app always acts as the app
// registration (AZURE_CLIENT_ID, the identity Business Central lists) and, without a secret,
// proves it with a token of its managed identity (AZURE_FEDERATED_IDENTITY_CLIENT_ID), which the
// app registration trusts through a federated identity credential (the postprovision hook adds it).
var appSettings = {
  AzureWebJobsStorage__accountName: stg.name
  AzureWebJobsStorage__clientId: identityClientId
  AZURE_TENANT_ID: empty(entraTenantId) ? tenant().tenantId : entraTenantId
  AZURE_CLIENT_ID: entraClientId
  AZURE_FEDERATED_IDENTITY_CLIENT_ID: empty(clientSecretUri) ? identityClientId : ''
  AZURE_AUTHORITY_HOST: authorityHost
  GRAPH_BASE_URL: graphBaseUrl
  BC_BASE_URL: bcBaseUrl
  BC_ENVIRONMENT: bcEnvironment
  BC_COMPANY_ID: bcCompanyId
  BOOKINGS_BUSINESS_IDS: bookingsBusinessIds
  SYNC_SCHEDULE: syncSchedule
  SYNC_LOOKBACK_DAYS: syncLookbackDays
  SYNC_LOOKAHEAD_DAYS: syncLookaheadDays
  SYNC_CUSTOMERS: syncCustomers
  SYNC_ITEMS: syncItems
  CUSTOMER_TEMPLATE: customerTemplate
  ITEM_TEMPLATE: itemTemplate
  INVOICE_FREE_BOOKINGS: invoiceFreeBookings
  WRITE_BACK_TO_BOOKINGS: writeBackToBookings
  BOOKINGS_TIME_ZONE: bookingsTimeZone
  HTTP_TIMEOUT_SECONDS: httpTimeoutSeconds
  BC_EXECUTION_LIMIT_SECONDS: bcExecutionLimitSeconds
  BC_QUEUE_TIMEOUT_SECONDS: bcQueueTimeoutSeconds
  BC_WEB_CLIENT_URL: bcWebClientUrl
  PAGES_ALLOWED_ROLE: pagesAllowedRole
  PAGES_ALLOW_GUESTS: pagesAllowGuests
  PAGES_REDIRECT_URI: empty(pagesRedirectUri) ? defaultRedirectUri : pagesRedirectUri
  PUSH_CUSTOMERS_TO_BOOKINGS: pushCustomersToBookings
  PUSH_ITEMS_TO_BOOKINGS: pushItemsToBookings
  BC_CUSTOMER_FILTER: bcCustomerFilter
  BC_ITEM_FILTER: bcItemFilter
  BUSINESS_COMPANIES: businessCompanies
  INVOICE_DIMENSIONS: invoiceDimensions
  BILLING_PERIOD: billingPeriod
  BILLING_SCHEDULE: billingSchedule
}

// A Key Vault reference without a version (trailing slash): after a rotation the app reads the
// newest version on its next restart, or within 24 hours. Without a secret the setting is written
// empty, not left out: the site module merges existing app settings, so a secret left out would
// stay in force after moving to the federated credential.
var clientSecretSettings = empty(clientSecretUri) ? {
  AZURE_CLIENT_SECRET: ''
} : {
  AZURE_CLIENT_SECRET: '@Microsoft.KeyVault(SecretUri=${clientSecretUri}/)'
}

// Settings only the Functions host and the Python worker read. With
// PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY the worker exports Python logs itself (Azure Monitor
// distro), so `extra={...}` lands in customDimensions: the setting "Use OpenTelemetry with Azure
// Functions" documents for Python and Application Insights (PYTHON_ENABLE_OPENTELEMETRY is the one
// for an OTLP exporter). The worker attaches the exporter to the root logger
// (PYTHON_APPLICATIONINSIGHTS_LOGGER_NAME, not set: one logger name cannot cover both `shared` and
// `function_app`); shared/telemetry.py sets the levels. (No comments inside object literals: the
// Bicep parser checkov uses cannot read them.)
var hostSettings = {
  AzureWebJobsStorage__credential: 'managedidentity'
  APPLICATIONINSIGHTS_CONNECTION_STRING: applicationInsights.properties.ConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
  PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY: 'true'
}

module api 'br/public:avm/res/web/site:0.15.1' = {
  name: '${serviceName}-flex-consumption'
  params: {
    kind: 'functionapp,linux'
    name: name
    location: location
    tags: union(tags, { 'azd-service-name': serviceName })
    serverFarmResourceId: appServicePlanId
    managedIdentities: {
      userAssignedResourceIds: [
        identityId
      ]
    }
    keyVaultAccessIdentityResourceId: identityId
    httpsOnly: true
    siteConfig: {
      alwaysOn: false
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
    }
    basicPublishingCredentialsPolicies: [
      {
        name: 'ftp'
        allow: false
      }
      {
        name: 'scm'
        allow: false
      }
    ]
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${stg.properties.primaryEndpoints.blob}${deploymentStorageContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
      }
      runtime: {
        name: 'python'
        version: runtimeVersion
      }
    }
    appSettingsKeyValuePairs: union(appSettings, clientSecretSettings, hostSettings)
  }
}

output SERVICE_API_NAME string = api.outputs.name
output SERVICE_API_URI string = 'https://${api.outputs.defaultHostname}'
output PAGES_REDIRECT_URI string = empty(pagesRedirectUri) ? defaultRedirectUri : pagesRedirectUri

// Bookings → Business Central invoicing: everything `azd up` needs in one resource group.
//
// Flex Consumption (FC1) Python function app, reaching its storage account, Key Vault and
// Application Insights with one user-assigned managed identity (no keys, no connection strings).
// Every setting the app reads (shared/settings.py) is a parameter below whose default is the one
// in local.settings.sample.json; tests/test_infra.py keeps the two from drifting apart.
targetScope = 'subscription'

// ---------------------------------------------------------------------------------------------
// Deployment
// ---------------------------------------------------------------------------------------------

@minLength(1)
@maxLength(64)
@description('Name of the azd environment; seeds the unique suffix of every resource name.')
param environmentName string

@minLength(1)
@description('Region of every resource. Only regions that offer Flex Consumption are listed (`az functionapp list-flexconsumption-locations`).')
@allowed([
  'australiaeast'
  'australiasoutheast'
  'brazilsouth'
  'canadacentral'
  'centralindia'
  'centralus'
  'eastasia'
  'eastus'
  'eastus2'
  'francecentral'
  'germanywestcentral'
  'italynorth'
  'japaneast'
  'koreacentral'
  'northcentralus'
  'northeurope'
  'norwayeast'
  'southafricanorth'
  'southcentralus'
  'southeastasia'
  'southindia'
  'spaincentral'
  'swedencentral'
  'uaenorth'
  'uksouth'
  'ukwest'
  'westcentralus'
  'westeurope'
  'westus'
  'westus2'
  'westus3'
])
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Object id of the person (or service principal) running azd. It gets data access to the tables, queues and Key Vault so they can be inspected from the portal. Empty: no such access.')
param principalId string = ''

@description('Resource group name. Empty: rg-<environmentName>.')
param resourceGroupName string = ''

@description('E-mail address that receives the alerts. Empty: the alert rules still fire (Monitor → Alerts) but notify nobody.')
param alertEmail string = ''

@description('How long without a finished sync run before the "sync stalled" alert fires. Keep it longer than SYNC_SCHEDULE\'s interval.')
@allowed([
  'PT1H'
  'PT2H'
  'PT6H'
  'P1D'
])
param syncStalledAfter string = 'PT1H'

@description('Memory of one Flex Consumption instance, in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

// Flex Consumption's bounds on the maximum instance count ("Limit scale-out" in
// learn.microsoft.com/azure/azure-functions/event-driven-scaling, Flex Consumption plan).
@description('Upper bound on instances. Graph and Business Central throttle per app, so more instances do not mean more throughput.')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 40

// ---------------------------------------------------------------------------------------------
// App settings: one parameter per setting of shared/settings.py (name in the description).
// Defaults are local.settings.sample.json's, except the endpoints (the real services instead of
// the local simulators) and the identifiers that only exist in your tenant.
// ---------------------------------------------------------------------------------------------

@description('AZURE_TENANT_ID: Entra tenant of the app registration, Graph and Business Central. Empty: the tenant of the deployment.')
param entraTenantId string = tenant().tenantId

@minLength(1)
@description('AZURE_CLIENT_ID: application (client) id of the Entra app registration the app acts as (README Deploy, step 1).')
param entraClientId string

@secure()
@description('AZURE_CLIENT_SECRET: a client secret of the app registration, stored in Key Vault and referenced from the app setting. Empty (the default): no secret; the app signs in with a client assertion from the managed identity, which the app registration trusts through a federated identity credential (AZURE_FEDERATED_IDENTITY_CLIENT_ID, set up by the postprovision hook in azure.yaml).')
param entraClientSecret string = ''

@description('AZURE_AUTHORITY_HOST: Entra authority.')
param authorityHost string = 'https://login.microsoftonline.com'

@description('GRAPH_BASE_URL: Microsoft Graph root.')
param graphBaseUrl string = 'https://graph.microsoft.com/v1.0'

@description('BC_BASE_URL: Business Central API root.')
param bcBaseUrl string = 'https://api.businesscentral.dynamics.com/v2.0'

@description('BC_ENVIRONMENT: Business Central environment name, as in the BC URL (e.g. production).')
param bcEnvironment string = 'sandbox'

@minLength(1)
@description('BC_COMPANY_ID: id (GUID) of the Business Central company that gets the invoices.')
param bcCompanyId string

@minLength(1)
@description('BOOKINGS_BUSINESS_IDS: comma-separated Bookings business ids (their e-mail addresses).')
param bookingsBusinessIds string

@description('SYNC_SCHEDULE: NCRONTAB schedule of the sync timer.')
param syncSchedule string = '0 */15 * * * *'

@description('SYNC_LOOKBACK_DAYS: days before today that every sync re-reads.')
param syncLookbackDays string = '60'

@description('SYNC_LOOKAHEAD_DAYS: days after today that every sync reads.')
param syncLookaheadDays string = '30'

@description('SYNC_CUSTOMERS: upsert Bookings customers into Business Central.')
@allowed([
  'true'
  'false'
])
param syncCustomers string = 'true'

@description('SYNC_ITEMS: upsert Bookings services into Business Central as service items.')
@allowed([
  'true'
  'false'
])
param syncItems string = 'true'

@description('CUSTOMER_TEMPLATE: code of the template for new Business Central customers. Empty: no template.')
param customerTemplate string = ''

@description('ITEM_TEMPLATE: code of the template for new Business Central items. Empty: no template.')
param itemTemplate string = ''

@description('INVOICE_FREE_BOOKINGS: list and invoice free appointments too.')
@allowed([
  'true'
  'false'
])
param invoiceFreeBookings string = 'false'

@description('WRITE_BACK_TO_BOOKINGS: note the invoice number in the appointment\'s staff notes (needs BookingsAppointment.ReadWrite.All).')
@allowed([
  'true'
  'false'
])
param writeBackToBookings string = 'false'

@description('BOOKINGS_TIME_ZONE: IANA time zone of the dates on invoice lines.')
param bookingsTimeZone string = 'UTC'

@description('HTTP_TIMEOUT_SECONDS: timeout of one call to Graph or Business Central.')
param httpTimeoutSeconds string = '60'

@description('BC_EXECUTION_LIMIT_SECONDS: how long Business Central may go on running a request after the app stopped waiting; unknown outcomes are checked after this.')
param bcExecutionLimitSeconds string = '600'

@description('BC_QUEUE_TIMEOUT_SECONDS: how long a request may wait in Business Central\'s queue before BC drops it (503); a create of unknown outcome is repeated only after 2 x HTTP_TIMEOUT_SECONDS + this + BC_EXECUTION_LIMIT_SECONDS.')
param bcQueueTimeoutSeconds string = '480'

@description('BC_WEB_CLIENT_URL: where people open Business Central; the operator pages link each draft invoice there.')
param bcWebClientUrl string = 'https://businesscentral.dynamics.com'

@description('PAGES_ALLOWED_ROLE: the app role (value) of the app registration that users of the operator pages must hold; the postprovision hook defines it on the app registration. `*`: every member of the tenant.')
param pagesAllowedRole string = 'Invoicing.Operator'

@description('PAGES_ALLOW_GUESTS: let guests (B2B users) of the tenant use the operator pages too, when they hold the role.')
@allowed([
  'true'
  'false'
])
param pagesAllowGuests string = 'false'

@description('PAGES_REDIRECT_URI: the operator pages\' sign-in redirect URI. Empty: https://<function app>.azurewebsites.net/api/pages/signin/callback (set it for a custom domain).')
param pagesRedirectUri string = ''

@allowed([
  'true'
  'false'
])
@description('PUSH_CUSTOMERS_TO_BOOKINGS: each sync also puts BC customers (persons with an e-mail) into every Bookings business.')
param pushCustomersToBookings string = 'false'

@allowed([
  'true'
  'false'
])
@description('PUSH_ITEMS_TO_BOOKINGS: each sync also puts BC service items into every Bookings business as services.')
param pushItemsToBookings string = 'false'

@description('BC_CUSTOMER_FILTER: OData $filter narrowing the customers pushed (BC API v2.0 customer fields), e.g. city eq \'Oslo\'.')
param bcCustomerFilter string = ''

@description('BC_ITEM_FILTER: OData $filter narrowing the service items pushed (BC API v2.0 item fields).')
param bcItemFilter string = ''

@description('BUSINESS_COMPANIES: comma-separated business-id=company-id pairs; businesses not named bill into BC_COMPANY_ID.')
param businessCompanies string = ''

@description('INVOICE_DIMENSIONS: comma-separated business-id:CODE=VALUE entries, BC dimension values put on every invoice of the business.')
param invoiceDimensions string = ''

@allowed([
  ''
  'month'
  'week'
])
@description('BILLING_PERIOD: month or week, one billing run per closed period; empty: no billing runs.')
param billingPeriod string = ''

@description('BILLING_SCHEDULE: NCRONTAB schedule of the billing timer (UTC); a run happens at most once a period.')
param billingSchedule string = '0 0 6 1 * *'

// ---------------------------------------------------------------------------------------------

var abbrs = loadJsonContent('./abbreviations.json')
var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = { 'azd-env-name': environmentName }
var functionAppName = '${abbrs.webSitesFunctions}api-${resourceToken}'
var deploymentStorageContainerName = 'app-package-${take(functionAppName, 32)}-${take(toLower(uniqueString(functionAppName, resourceToken)), 7)}'
// The app's bookkeeping blobs (leases, run summaries; the operator may read them) and the pages'
// signing keys (shared/web/signing_keys.py; only the app's identity reads them).
var bookkeepingContainerName = 'bookings-invoicing'
var pagesKeysContainerName = 'pages-keys'

resource rg 'Microsoft.Resources/resourceGroups@2021-04-01' = {
  name: !empty(resourceGroupName) ? resourceGroupName : '${abbrs.resourcesResourceGroups}${environmentName}'
  location: location
  tags: tags
}

// The one identity of the app: storage (host and app), Key Vault references, App Insights ingestion,
// and the client assertion with which the app signs in as the app registration (federated identity
// credential on the app registration, created by the postprovision hook: azure.yaml, infra/hooks/).
module apiIdentity 'br/public:avm/res/managed-identity/user-assigned-identity:0.4.1' = {
  name: 'apiIdentity'
  scope: rg
  params: {
    name: '${abbrs.managedIdentityUserAssignedIdentities}api-${resourceToken}'
    location: location
    tags: tags
  }
}

// Tables and queues of the app, the host's own state and the deployment package. Keys are off:
// everyone reaches it with Entra ID.
module storage 'br/public:avm/res/storage/storage-account:0.8.3' = {
  name: 'storage'
  scope: rg
  params: {
    name: '${abbrs.storageStorageAccounts}${resourceToken}'
    location: location
    tags: tags
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    dnsEndpointType: 'Standard'
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
    blobServices: {
      containers: [
        {
          name: deploymentStorageContainerName
        }
        {
          name: bookkeepingContainerName
        }
        {
          name: pagesKeysContainerName
        }
      ]
    }
    minimumTlsVersion: 'TLS1_2'
  }
}

module logAnalytics 'br/public:avm/res/operational-insights/workspace:0.7.0' = {
  name: 'logAnalytics'
  scope: rg
  params: {
    name: '${abbrs.operationalInsightsWorkspaces}${resourceToken}'
    location: location
    tags: tags
    dataRetention: 30
  }
}

// Entra-only ingestion: the identity sends telemetry with Monitoring Metrics Publisher (rbac.bicep).
module monitoring 'br/public:avm/res/insights/component:0.4.1' = {
  name: 'monitoring'
  scope: rg
  params: {
    name: '${abbrs.insightsComponents}${resourceToken}'
    location: location
    tags: tags
    workspaceResourceId: logAnalytics.outputs.resourceId
    disableLocalAuth: true
  }
}

// Holds the client secret (when there is one). RBAC mode; no purge protection because its only
// content can be re-issued in Entra at any time, and purge protection would block `azd down --purge`.
module keyVault 'br/public:avm/res/key-vault/vault:0.13.3' = {
  name: 'keyVault'
  scope: rg
  params: {
    name: '${abbrs.keyVaultVaults}${resourceToken}'
    location: location
    tags: tags
    sku: 'standard'
    enableRbacAuthorization: true
    enablePurgeProtection: false
    softDeleteRetentionInDays: 7
    enableVaultForDeployment: false
    enableVaultForTemplateDeployment: false
    enableVaultForDiskEncryption: false
  }
}

module clientSecret 'app/secret.bicep' = if (!empty(entraClientSecret)) {
  name: 'clientSecret'
  scope: rg
  params: {
    keyVaultName: keyVault.outputs.name
    name: 'entra-client-secret'
    value: entraClientSecret
  }
}

module appServicePlan 'br/public:avm/res/web/serverfarm:0.1.1' = {
  name: 'appServicePlan'
  scope: rg
  params: {
    name: '${abbrs.webServerFarms}${resourceToken}'
    location: location
    tags: tags
    sku: {
      name: 'FC1'
      tier: 'FlexConsumption'
    }
    reserved: true
  }
}

module rbac 'app/rbac.bicep' = {
  name: 'rbac'
  scope: rg
  params: {
    storageAccountName: storage.outputs.name
    bookkeepingContainerName: bookkeepingContainerName
    applicationInsightsName: monitoring.outputs.name
    keyVaultName: keyVault.outputs.name
    managedIdentityPrincipalId: apiIdentity.outputs.principalId
    userPrincipalId: principalId
  }
}

// After rbac: the host reads storage and resolves the Key Vault reference at its first start.
module api 'app/api.bicep' = {
  name: 'api'
  scope: rg
  params: {
    name: functionAppName
    location: location
    tags: tags
    appServicePlanId: appServicePlan.outputs.resourceId
    storageAccountName: storage.outputs.name
    deploymentStorageContainerName: deploymentStorageContainerName
    applicationInsightsName: monitoring.outputs.name
    identityId: apiIdentity.outputs.resourceId
    identityClientId: apiIdentity.outputs.clientId
    instanceMemoryMB: instanceMemoryMB
    maximumInstanceCount: maximumInstanceCount
    clientSecretUri: empty(entraClientSecret) ? '' : clientSecret.outputs.secretUri
    entraTenantId: entraTenantId
    entraClientId: entraClientId
    authorityHost: authorityHost
    graphBaseUrl: graphBaseUrl
    bcBaseUrl: bcBaseUrl
    bcEnvironment: bcEnvironment
    bcCompanyId: bcCompanyId
    bookingsBusinessIds: bookingsBusinessIds
    syncSchedule: syncSchedule
    syncLookbackDays: syncLookbackDays
    syncLookaheadDays: syncLookaheadDays
    syncCustomers: syncCustomers
    syncItems: syncItems
    customerTemplate: customerTemplate
    itemTemplate: itemTemplate
    invoiceFreeBookings: invoiceFreeBookings
    writeBackToBookings: writeBackToBookings
    bookingsTimeZone: bookingsTimeZone
    httpTimeoutSeconds: httpTimeoutSeconds
    bcExecutionLimitSeconds: bcExecutionLimitSeconds
    bcQueueTimeoutSeconds: bcQueueTimeoutSeconds
    bcWebClientUrl: bcWebClientUrl
    pagesAllowedRole: pagesAllowedRole
    pagesAllowGuests: pagesAllowGuests
    pagesRedirectUri: pagesRedirectUri
    pushCustomersToBookings: pushCustomersToBookings
    pushItemsToBookings: pushItemsToBookings
    bcCustomerFilter: bcCustomerFilter
    bcItemFilter: bcItemFilter
    businessCompanies: businessCompanies
    invoiceDimensions: invoiceDimensions
    billingPeriod: billingPeriod
    billingSchedule: billingSchedule
  }
  dependsOn: [
    rbac
  ]
}

// Charts of the app's structured logs, under Application Insights → Workbooks (README Operate).
module workbook 'app/workbook.bicep' = {
  name: 'workbook'
  scope: rg
  params: {
    location: location
    tags: tags
    applicationInsightsName: monitoring.outputs.name
  }
}

module alerts 'app/alerts.bicep' = {
  name: 'alerts'
  scope: rg
  params: {
    location: location
    tags: tags
    resourceToken: resourceToken
    applicationInsightsName: monitoring.outputs.name
    alertEmail: alertEmail
    syncStalledAfter: syncStalledAfter
  }
}

// Written to .azure/<env>/.env by azd; the README Deploy and Operate sections use them.
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output SERVICE_API_NAME string = api.outputs.SERVICE_API_NAME
output SERVICE_API_URI string = api.outputs.SERVICE_API_URI
@description('The Web redirect URI of the app registration people sign in to the operator pages with (the app setting PAGES_REDIRECT_URI).')
output PAGES_REDIRECT_URI string = api.outputs.PAGES_REDIRECT_URI
@description('The app role the operator pages require: the postprovision hook defines it on the app registration.')
output PAGES_APP_ROLE string = pagesAllowedRole
@description('The tenant of the app registration (AZURE_TENANT_ID), which must be the managed identity\'s (AZURE_TENANT_ID output): the hook checks it.')
output APP_REGISTRATION_TENANT_ID string = empty(entraTenantId) ? tenant().tenantId : entraTenantId
output AZURE_FUNCTION_NAME string = api.outputs.SERVICE_API_NAME
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AZURE_KEY_VAULT_NAME string = keyVault.outputs.name
output APPLICATIONINSIGHTS_NAME string = monitoring.outputs.name
output API_IDENTITY_CLIENT_ID string = apiIdentity.outputs.clientId
@description('Subject of the federated identity credential on the app registration (the postprovision hook reads it).')
output API_IDENTITY_PRINCIPAL_ID string = apiIdentity.outputs.principalId
@description('Issuer of that credential: the Entra authority of the managed identity\'s tenant, which must be the app registration\'s.')
output FEDERATED_CREDENTIAL_ISSUER string = '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'
@description('The app registration the hook adds the credential to (so a value azd prompted for lands in .env as well).')
output ENTRA_CLIENT_ID string = entraClientId
output WORKBOOK_ID string = workbook.outputs.id
@description('Opens the workbook in the Azure portal.')
output WORKBOOK_URL string = workbook.outputs.portalUrl

# azd postprovision hook (azure.yaml), Windows twin of federated-credential.sh. Bicep cannot write
# to Entra ID without the Microsoft Graph extension, so this hook sets up the app registration
# ENTRA_CLIENT_ID with the Azure CLI:
# 1. the app role the operator pages require (PAGES_APP_ROLE, default Invoicing.Operator) is
#    defined on it, added to the roles it has (assign people to it in Enterprise applications);
# 2. its ID tokens carry the optional claim login_hint (added to the ones it has), which the pages
#    send back as logout_hint at sign-out: Entra then ends that account's session without asking
#    the person which account to sign out of;
# 3. unless ENTRA_CLIENT_SECRET is set, it trusts the function app's user-assigned managed identity
#    through a federated identity credential, so the app signs in as the app registration with a
#    token of that identity and no secret exists (Microsoft Entra ID: "Configure an application to
#    trust a managed identity"). Microsoft requires the app registration and the managed identity
#    in the same tenant: the hook checks it first. Idempotent: creates the credential, updates it
#    when the identity changed (the update leaves `name` out: it cannot change), and leaves an
#    equivalent one (e.g. added in the portal) alone.
#
# Reads the azd environment (main.bicep outputs): ENTRA_CLIENT_ID, API_IDENTITY_PRINCIPAL_ID,
# FEDERATED_CREDENTIAL_ISSUER, AZURE_TENANT_ID (the managed identity's), APP_REGISTRATION_TENANT_ID,
# PAGES_APP_ROLE; AZURE_ENV_NAME names the credential. Needs PowerShell 7 (pwsh), azd 1.18.2 or
# later and the Azure CLI signed in (`az login --tenant <the app registration's tenant>`) as an
# owner of the app registration, or an Application Administrator or Cloud Application
# Administrator (an Application Developer only for applications they own).
$ErrorActionPreference = 'Stop'

if ($PSVersionTable.PSVersion.Major -lt 7) {
  Write-Error "PowerShell $($PSVersionTable.PSVersion) runs this hook; PowerShell 7 (pwsh) is needed: https://aka.ms/powershell"
  exit 1
}

# azd reads .funcignore from 1.18.0 (older versions upload local.settings.json and node_modules)
# and runs this hook with pwsh from 1.18.2: refuse an older azd before it deploys.
if (Get-Command azd -ErrorAction SilentlyContinue) {
  $azdText = (azd version 2>$null) -join ' '
  if ($azdText -match 'azd version (\d+\.\d+\.\d+)' -and [version]$Matches[1] -lt [version]'1.18.2') {
    Write-Error "azd $($Matches[1]) is too old: 1.18.2 or later is needed (older versions deploy local.settings.json and node_modules). Update azd, then run ``azd up`` again."
    exit 1
  }
}

$app = $env:ENTRA_CLIENT_ID
if (-not $app) {
  Write-Error "ENTRA_CLIENT_ID must be set (azd env set ENTRA_CLIENT_ID <the app registration's client id>)."
  exit 1
}
if (-not (Get-Command az -ErrorAction SilentlyContinue)) {
  Write-Error "The Azure CLI (az) is needed to set up app registration $app."
  exit 1
}

$appTenant = $env:APP_REGISTRATION_TENANT_ID
$signedIn = az account show --query tenantId -o tsv
if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
if ($appTenant -and $signedIn -ne $appTenant) {
  Write-Error "The Azure CLI is signed in to tenant $signedIn, but app registration $app lives in tenant ${appTenant}: run ``az login --tenant $appTenant``, then ``azd hooks run postprovision``."
  exit 1
}

# 1. The app role of the operator pages.
$role = $env:PAGES_APP_ROLE
if ($role -and $role -ne '*') {
  if ($role -notmatch '^[A-Za-z0-9._-]+$') {
    Write-Error "PAGES_ALLOWED_ROLE '$role' is not an app role value (letters, digits, '.', '_', '-')."
    exit 1
  }
  $defined = az ad app show --id $app --query "appRoles[?value=='$role'].value" -o tsv
  if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
  if (-not $defined) {
    $roles = @(az ad app show --id $app --query appRoles -o json | ConvertFrom-Json)
    if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
    # The roles it has, then the new one: the update replaces the whole list.
    $roles += [pscustomobject]@{
      allowedMemberTypes = @('User')
      description        = "Use the operator pages of bookings-invoicing: invoice bookings, edit templates, see customers' data."
      displayName        = 'Invoicing operator'
      id                 = [guid]::NewGuid().ToString()
      isEnabled          = $true
      value              = $role
    }
    $rolesFile = New-TemporaryFile
    try {
      ConvertTo-Json -InputObject $roles -Depth 5 | Set-Content -Path $rolesFile -Encoding utf8
      Write-Host "Defining app role $role on app registration $app (assign people to it: Enterprise applications → Users and groups)."
      az ad app update --id $app --app-roles "@$($rolesFile.FullName)" --only-show-errors -o none
      if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
    }
    finally {
      Remove-Item -Path $rolesFile -ErrorAction SilentlyContinue
    }
  }
  else {
    Write-Host "App registration $app already defines app role $role."
  }
}

# 2. The login_hint optional claim in ID tokens ("To use logout_hint, enable the login_hint
#    optional claim in your client application"); the update replaces the whole optionalClaims.
$hinted = az ad app show --id $app --query "optionalClaims.idToken[?name=='login_hint'].name" -o tsv
if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
if (-not $hinted) {
  $claims = az ad app show --id $app --query optionalClaims -o json | ConvertFrom-Json
  if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
  $optional = [ordered]@{
    idToken     = @(@($claims.idToken | Where-Object { $_ }) + [pscustomobject]@{ name = 'login_hint'; essential = $false })
    accessToken = @($claims.accessToken | Where-Object { $_ })
    saml2Token  = @($claims.saml2Token | Where-Object { $_ })
  }
  $claimsFile = New-TemporaryFile
  try {
    ConvertTo-Json -InputObject $optional -Depth 5 | Set-Content -Path $claimsFile -Encoding utf8
    Write-Host "Adding the optional claim login_hint to the ID tokens of app registration $app (sign-out names the account)."
    az ad app update --id $app --optional-claims "@$($claimsFile.FullName)" --only-show-errors -o none
    if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
  }
  finally {
    Remove-Item -Path $claimsFile -ErrorAction SilentlyContinue
  }
}
else {
  Write-Host "App registration $app already puts login_hint in its ID tokens."
}

# 3. The federated identity credential.
if ($env:ENTRA_CLIENT_SECRET) {
  Write-Host 'ENTRA_CLIENT_SECRET is set: the app signs in with the client secret; no federated credential needed.'
  exit 0
}

$subject = $env:API_IDENTITY_PRINCIPAL_ID
$issuer = $env:FEDERATED_CREDENTIAL_ISSUER
$identityTenant = $env:AZURE_TENANT_ID
$audience = 'api://AzureADTokenExchange'
if (-not $subject -or -not $issuer) {
  Write-Error 'API_IDENTITY_PRINCIPAL_ID and FEDERATED_CREDENTIAL_ISSUER must be set (azd provision sets them).'
  exit 1
}
if ($appTenant -and $identityTenant -and $appTenant -ne $identityTenant) {
  Write-Error "App registration $app is in tenant $appTenant but the function app's managed identity is in tenant $identityTenant (the subscription's). Microsoft requires both in the same tenant for a federated credential: deploy into a subscription of tenant $appTenant, or give the app a client secret (azd env set ENTRA_CLIENT_SECRET '<secret>', then azd provision)."
  exit 1
}
$envName = if ($env:AZURE_ENV_NAME) { $env:AZURE_ENV_NAME } else { 'app' }
# 3-120 characters: letters, digits, '-' and '_', starting with a letter or digit.
$name = ("bookings-invoicing-$envName" -replace '[^A-Za-z0-9_-]', '-')
if ($name.Length -gt 120) { $name = $name.Substring(0, 120) }

$same = az ad app federated-credential list --id $app `
  --query "[?issuer=='$issuer' && subject=='$subject' && contains(audiences, '$audience')].name" -o tsv
if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
if ($same) {
  Write-Host "App registration $app already trusts managed identity $subject ($same)."
  exit 0
}

$parameters = New-TemporaryFile
try {
  $credential = [ordered]@{
    issuer      = $issuer
    subject     = $subject
    audiences   = @($audience)
    description = "The function app's managed identity signs in as this app (azd environment $($env:AZURE_ENV_NAME))"
  }
  $mine = az ad app federated-credential list --id $app --query "[?name=='$name'].name" -o tsv
  if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
  if ($mine) {
    # Graph's PATCH takes what changes; a credential's name cannot change, so it is left out.
    $credential | ConvertTo-Json | Set-Content -Path $parameters -Encoding utf8
    Write-Host "Updating federated credential $name of app registration ${app}: subject $subject."
    az ad app federated-credential update --id $app --federated-credential-id $name `
      --parameters $parameters.FullName --only-show-errors -o none
  }
  else {
    $create = [ordered]@{ name = $name }
    foreach ($key in $credential.Keys) { $create[$key] = $credential[$key] }
    $create | ConvertTo-Json | Set-Content -Path $parameters -Encoding utf8
    Write-Host "Adding federated credential $name to app registration ${app}: issuer $issuer, subject $subject."
    az ad app federated-credential create --id $app --parameters $parameters.FullName --only-show-errors -o none
  }
  if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
}
finally {
  Remove-Item -Path $parameters -ErrorAction SilentlyContinue
}

# azd postprovision hook (azure.yaml), Windows twin of federated-credential.sh: make the app
# registration ENTRA_CLIENT_ID trust the function app's user-assigned managed identity through a
# federated identity credential, so the app signs in as the app registration with a token of that
# identity and no secret exists (Microsoft Entra ID: "Configure an application to trust a managed
# identity"). Idempotent: creates the credential, updates it when the identity changed, and leaves
# an equivalent one (e.g. added in the portal) alone.
#
# Reads the azd environment (main.bicep outputs): ENTRA_CLIENT_ID, API_IDENTITY_PRINCIPAL_ID,
# FEDERATED_CREDENTIAL_ISSUER; AZURE_ENV_NAME names the credential. With ENTRA_CLIENT_SECRET set
# the app uses the secret, and the hook does nothing. Needs the Azure CLI signed in (`az login`)
# as an owner of the app registration or an Application Administrator, Application Developer or
# Cloud Application Administrator.
$ErrorActionPreference = 'Stop'

if ($env:ENTRA_CLIENT_SECRET) {
  Write-Host 'ENTRA_CLIENT_SECRET is set: the app signs in with the client secret; no federated credential needed.'
  exit 0
}

$app = $env:ENTRA_CLIENT_ID
$subject = $env:API_IDENTITY_PRINCIPAL_ID
$issuer = $env:FEDERATED_CREDENTIAL_ISSUER
$audience = 'api://AzureADTokenExchange'
if (-not $app -or -not $subject -or -not $issuer) {
  Write-Error 'ENTRA_CLIENT_ID, API_IDENTITY_PRINCIPAL_ID and FEDERATED_CREDENTIAL_ISSUER must be set (azd provision sets the last two).'
  exit 1
}
$envName = if ($env:AZURE_ENV_NAME) { $env:AZURE_ENV_NAME } else { 'app' }
# 3-120 characters: letters, digits, '-' and '_', starting with a letter or digit.
$name = ("bookings-invoicing-$envName" -replace '[^A-Za-z0-9_-]', '-')
if ($name.Length -gt 120) { $name = $name.Substring(0, 120) }

if (-not (Get-Command az -ErrorAction SilentlyContinue)) {
  Write-Error "The Azure CLI (az) is needed to add the federated credential to app registration $app."
  exit 1
}

$same = az ad app federated-credential list --id $app `
  --query "[?issuer=='$issuer' && subject=='$subject' && contains(audiences, '$audience')].name" -o tsv
if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
if ($same) {
  Write-Host "App registration $app already trusts managed identity $subject ($same)."
  exit 0
}

$parameters = New-TemporaryFile
try {
  @{
    name        = $name
    issuer      = $issuer
    subject     = $subject
    audiences   = @($audience)
    description = "The function app's managed identity signs in as this app (azd environment $($env:AZURE_ENV_NAME))"
  } | ConvertTo-Json | Set-Content -Path $parameters -Encoding utf8

  $mine = az ad app federated-credential list --id $app --query "[?name=='$name'].name" -o tsv
  if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
  if ($mine) {
    Write-Host "Updating federated credential $name of app registration ${app}: subject $subject."
    az ad app federated-credential update --id $app --federated-credential-id $name `
      --parameters $parameters.FullName --only-show-errors -o none
  }
  else {
    Write-Host "Adding federated credential $name to app registration ${app}: issuer $issuer, subject $subject."
    az ad app federated-credential create --id $app --parameters $parameters.FullName --only-show-errors -o none
  }
  if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
}
finally {
  Remove-Item -Path $parameters -ErrorAction SilentlyContinue
}

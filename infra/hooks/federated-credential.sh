#!/bin/sh
# azd postprovision hook (azure.yaml): make the app registration ENTRA_CLIENT_ID trust the function
# app's user-assigned managed identity through a federated identity credential, so the app signs
# in as the app registration with a token of that identity and no secret exists (Microsoft Entra
# ID: "Configure an application to trust a managed identity"). Bicep cannot do this without the
# Microsoft Graph extension, hence a hook. Idempotent: creates the credential, updates it when the
# identity changed, and leaves an equivalent one (e.g. added in the portal) alone.
#
# Reads the azd environment (main.bicep outputs): ENTRA_CLIENT_ID, API_IDENTITY_PRINCIPAL_ID,
# FEDERATED_CREDENTIAL_ISSUER; AZURE_ENV_NAME names the credential. With ENTRA_CLIENT_SECRET set
# the app uses the secret, and the hook does nothing. Needs the Azure CLI signed in (`az login`)
# as an owner of the app registration or an Application Administrator, Application Developer or
# Cloud Application Administrator.
set -eu

if [ -n "${ENTRA_CLIENT_SECRET:-}" ]; then
  echo "ENTRA_CLIENT_SECRET is set: the app signs in with the client secret; no federated credential needed."
  exit 0
fi

app="${ENTRA_CLIENT_ID:-}"
subject="${API_IDENTITY_PRINCIPAL_ID:-}"
issuer="${FEDERATED_CREDENTIAL_ISSUER:-}"
audience="api://AzureADTokenExchange"
if [ -z "$app" ] || [ -z "$subject" ] || [ -z "$issuer" ]; then
  echo "ENTRA_CLIENT_ID, API_IDENTITY_PRINCIPAL_ID and FEDERATED_CREDENTIAL_ISSUER must be set (azd provision sets the last two)." >&2
  exit 1
fi
# 3-120 characters: letters, digits, '-' and '_', starting with a letter or digit.
name=$(printf 'bookings-invoicing-%s' "${AZURE_ENV_NAME:-app}" | tr -c 'A-Za-z0-9_\n-' '-' | cut -c1-120)

if ! command -v az >/dev/null 2>&1; then
  echo "The Azure CLI (az) is needed to add the federated credential to app registration $app." >&2
  exit 1
fi

same=$(az ad app federated-credential list --id "$app" \
  --query "[?issuer=='$issuer' && subject=='$subject' && contains(audiences, '$audience')].name" -o tsv)
if [ -n "$same" ]; then
  echo "App registration $app already trusts managed identity $subject ($same)."
  exit 0
fi

parameters=$(mktemp)
trap 'rm -f "$parameters"' EXIT
printf '{"name": "%s", "issuer": "%s", "subject": "%s", "audiences": ["%s"], "description": "%s"}\n' \
  "$name" "$issuer" "$subject" "$audience" \
  "The function app's managed identity signs in as this app (azd environment ${AZURE_ENV_NAME:-})" >"$parameters"

mine=$(az ad app federated-credential list --id "$app" --query "[?name=='$name'].name" -o tsv)
if [ -n "$mine" ]; then
  echo "Updating federated credential $name of app registration $app: subject $subject."
  az ad app federated-credential update --id "$app" --federated-credential-id "$name" \
    --parameters "$parameters" --only-show-errors -o none
else
  echo "Adding federated credential $name to app registration $app: issuer $issuer, subject $subject."
  az ad app federated-credential create --id "$app" --parameters "$parameters" --only-show-errors -o none
fi

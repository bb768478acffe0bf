#!/bin/sh
# azd postprovision hook (azure.yaml). Bicep cannot write to Entra ID without the Microsoft Graph
# extension, so this hook sets up the app registration ENTRA_CLIENT_ID with the Azure CLI:
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
# PAGES_APP_ROLE; AZURE_ENV_NAME names the credential. Needs azd 1.18.2 or later and the Azure CLI
# signed in (`az login --tenant <the app registration's tenant>`) as an owner of the app
# registration, or an Application Administrator or Cloud Application Administrator (an Application
# Developer only for applications they own).
set -eu

fail() {
  echo "$*" >&2
  exit 1
}

# azd reads .funcignore from 1.18.0 (older versions upload local.settings.json and node_modules)
# and runs this hook's Windows twin with pwsh from 1.18.2: refuse an older azd before it deploys.
if command -v azd >/dev/null 2>&1; then
  azd_version=$(azd version 2>/dev/null | sed -n 's/.*azd version \([0-9][0-9]*\.[0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)
  if [ -n "$azd_version" ] && ! echo "$azd_version" | awk -F. '{ exit !($1 > 1 || ($1 == 1 && ($2 > 18 || ($2 == 18 && $3 >= 2)))) }'; then
    fail "azd $azd_version is too old: 1.18.2 or later is needed (older versions deploy local.settings.json and node_modules). Update azd, then run \`azd up\` again."
  fi
fi

app="${ENTRA_CLIENT_ID:-}"
[ -n "$app" ] || fail "ENTRA_CLIENT_ID must be set (azd env set ENTRA_CLIENT_ID <the app registration's client id>)."
command -v az >/dev/null 2>&1 || fail "The Azure CLI (az) is needed to set up app registration $app."

app_tenant="${APP_REGISTRATION_TENANT_ID:-}"
signed_in=$(az account show --query tenantId -o tsv)
if [ -n "$app_tenant" ] && [ "$signed_in" != "$app_tenant" ]; then
  fail "The Azure CLI is signed in to tenant $signed_in, but app registration $app lives in tenant $app_tenant: run \`az login --tenant $app_tenant\`, then \`azd hooks run postprovision\`."
fi

# 1. The app role of the operator pages.
role="${PAGES_APP_ROLE:-}"
if [ -n "$role" ] && [ "$role" != "*" ]; then
  case "$role" in
    *[!A-Za-z0-9._-]*) fail "PAGES_ALLOWED_ROLE '$role' is not an app role value (letters, digits, '.', '_', '-')." ;;
  esac
  if [ -z "$(az ad app show --id "$app" --query "appRoles[?value=='$role'].value" -o tsv)" ]; then
    id=$( (uuidgen 2>/dev/null || cat /proc/sys/kernel/random/uuid) | tr 'A-Z' 'a-z')
    [ -n "$id" ] || fail "No GUID generator (uuidgen) to define app role $role with."
    new="{\"allowedMemberTypes\": [\"User\"], \"description\": \"Use the operator pages of bookings-invoicing: invoice bookings, edit templates, see customers' data.\", \"displayName\": \"Invoicing operator\", \"id\": \"$id\", \"isEnabled\": true, \"value\": \"$role\"}"
    roles_file=$(mktemp)
    az ad app show --id "$app" --query appRoles -o json >"$roles_file"
    if [ "$(tr -d ' \t\r\n' <"$roles_file")" = "[]" ]; then
      printf '[%s]\n' "$new" >"$roles_file"
    else
      # The roles it has, then the new one: the update replaces the whole list.
      kept=$(sed '$ s/][[:space:]]*$//' "$roles_file")
      printf '%s, %s]\n' "$kept" "$new" >"$roles_file"
    fi
    echo "Defining app role $role on app registration $app (assign people to it: Enterprise applications → Users and groups)."
    az ad app update --id "$app" --app-roles "@$roles_file" --only-show-errors -o none
    rm -f "$roles_file"
  else
    echo "App registration $app already defines app role $role."
  fi
fi

# 2. The login_hint optional claim in ID tokens ("To use logout_hint, enable the login_hint
#    optional claim in your client application"); the update replaces the whole optionalClaims.
if [ -z "$(az ad app show --id "$app" --query "optionalClaims.idToken[?name=='login_hint'].name" -o tsv)" ]; then
  claims_file=$(mktemp)
  az ad app show --id "$app" -o json --query "{idToken: [optionalClaims.idToken || \`[]\`, [{name: 'login_hint', essential: \`false\`}]][], accessToken: optionalClaims.accessToken || \`[]\`, saml2Token: optionalClaims.saml2Token || \`[]\`}" >"$claims_file"
  echo "Adding the optional claim login_hint to the ID tokens of app registration $app (sign-out names the account)."
  az ad app update --id "$app" --optional-claims "@$claims_file" --only-show-errors -o none
  rm -f "$claims_file"
else
  echo "App registration $app already puts login_hint in its ID tokens."
fi

# 3. The federated identity credential.
if [ -n "${ENTRA_CLIENT_SECRET:-}" ]; then
  echo "ENTRA_CLIENT_SECRET is set: the app signs in with the client secret; no federated credential needed."
  exit 0
fi

subject="${API_IDENTITY_PRINCIPAL_ID:-}"
issuer="${FEDERATED_CREDENTIAL_ISSUER:-}"
identity_tenant="${AZURE_TENANT_ID:-}"
audience="api://AzureADTokenExchange"
if [ -z "$subject" ] || [ -z "$issuer" ]; then
  fail "API_IDENTITY_PRINCIPAL_ID and FEDERATED_CREDENTIAL_ISSUER must be set (azd provision sets them)."
fi
if [ -n "$app_tenant" ] && [ -n "$identity_tenant" ] && [ "$app_tenant" != "$identity_tenant" ]; then
  fail "App registration $app is in tenant $app_tenant but the function app's managed identity is in tenant $identity_tenant (the subscription's). Microsoft requires both in the same tenant for a federated credential: deploy into a subscription of tenant $app_tenant, or give the app a client secret (azd env set ENTRA_CLIENT_SECRET '<secret>', then azd provision)."
fi
# 3-120 characters: letters, digits, '-' and '_', starting with a letter or digit.
name=$(printf 'bookings-invoicing-%s' "${AZURE_ENV_NAME:-app}" | tr -c 'A-Za-z0-9_\n-' '-' | cut -c1-120)

same=$(az ad app federated-credential list --id "$app" \
  --query "[?issuer=='$issuer' && subject=='$subject' && contains(audiences, '$audience')].name" -o tsv)
if [ -n "$same" ]; then
  echo "App registration $app already trusts managed identity $subject ($same)."
  exit 0
fi

parameters=$(mktemp)
trap 'rm -f "$parameters"' EXIT
description="The function app's managed identity signs in as this app (azd environment ${AZURE_ENV_NAME:-})"

mine=$(az ad app federated-credential list --id "$app" --query "[?name=='$name'].name" -o tsv)
if [ -n "$mine" ]; then
  # Graph's PATCH takes what changes; a credential's name cannot change, so it is left out.
  printf '{"issuer": "%s", "subject": "%s", "audiences": ["%s"], "description": "%s"}\n' \
    "$issuer" "$subject" "$audience" "$description" >"$parameters"
  echo "Updating federated credential $name of app registration $app: subject $subject."
  az ad app federated-credential update --id "$app" --federated-credential-id "$name" \
    --parameters "$parameters" --only-show-errors -o none
else
  printf '{"name": "%s", "issuer": "%s", "subject": "%s", "audiences": ["%s"], "description": "%s"}\n' \
    "$name" "$issuer" "$subject" "$audience" "$description" >"$parameters"
  echo "Adding federated credential $name to app registration $app: issuer $issuer, subject $subject."
  az ad app federated-credential create --id "$app" --parameters "$parameters" --only-show-errors -o none
fi

// One Key Vault secret. Every deployment with a changed value adds a new version; the app setting
// references the secret without a version, so the app reads the newest one (the README Deploy section).
param keyVaultName string
param name string

@secure()
param value string

@description('When the secret expires (seconds since 1970): by default 24 months from this deployment, the longest a client secret of Entra ID lives. Key Vault reports it near expiry; rotate before (README, Rotating the client secret).')
param expiresOn int = dateTimeToEpoch(dateTimeAdd(utcNow(), 'P2Y'))

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

resource secret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  parent: vault
  name: name
  properties: {
    value: value
    contentType: 'Entra client secret'
    attributes: {
      enabled: true
      exp: expiresOn
    }
  }
}

@description('Versionless URI of the secret, for a Key Vault reference.')
output secretUri string = secret.properties.secretUri

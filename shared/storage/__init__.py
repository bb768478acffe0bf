"""Storage: the app's only state, in one Azure Storage account (tables, queues, blobs), and the
named leases kept in it. Imports only the settings below it."""

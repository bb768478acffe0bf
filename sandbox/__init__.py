"""Local stand-ins for everything the app talks to: Azurite, and simulators of Entra ID,
Microsoft Graph Bookings and Business Central API v2.0, plus an in-process Functions host.

Used by the demo, the tests and the benchmark. Never deployed (see .funcignore)."""

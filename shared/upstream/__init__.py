"""Upstream: the clients of the outside world (Microsoft Graph Bookings, Business Central, Entra
ID tokens) and the limits they are used within (per process and, through storage, app-wide)."""

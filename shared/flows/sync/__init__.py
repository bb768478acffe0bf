"""Sync: each Bookings business's calendar window, pulled from Graph into the `bookings` table."""

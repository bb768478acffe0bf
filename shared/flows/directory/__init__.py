"""Directory: Bookings customers and services as Business Central customers and items, and back."""

"""Flows: the work itself, in the order a booking meets it: `sync` pulls the calendars, `directory`
makes their customers and services BC records, `invoicing` turns bookings into BC draft invoices.
`messages` and `bookings` are what the flows pass between them; `attention` and `checks` read
across them for the pages and the status."""

"""Invoicing: uninvoiced bookings, jobs, and the worker that makes each job's BC draft invoices."""

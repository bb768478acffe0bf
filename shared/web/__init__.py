"""Web: the HTTP surface (API contract, OpenAPI, the Functions blueprints) and the operator pages
with their sign-in."""

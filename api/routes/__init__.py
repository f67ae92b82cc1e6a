"""The API's routes, one module per resource; none imports another."""

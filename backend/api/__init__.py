"""HTTP front doors: each router turns requests into service calls and service results into responses."""

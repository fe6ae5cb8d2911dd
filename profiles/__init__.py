"""Memory profiles, shipped as TOML data files (read by scail2_lite.planner)."""

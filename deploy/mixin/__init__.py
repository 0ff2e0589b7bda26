"""The one definition the alert rules, the SLO rules and the dashboards are all generated from (see config.py)."""

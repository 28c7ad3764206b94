"""Config files: each module's get_config() returns a ml_collections.ConfigDict (see base.py for all fields)."""

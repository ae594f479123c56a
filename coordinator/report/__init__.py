"""The HTML report of a coordinator's rounds, with its plots."""

"""Generated protocol stubs for crowdsft.v1. Do not edit: run proto/generate.py."""

"""Fake of the WebUI's `modules` package (AUTOMATIC1111 / Forge), for contract tests."""

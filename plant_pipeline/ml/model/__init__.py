"""The model: which LLaVA to load (hub id, local folder or the built-in tiny one) and how.
"""

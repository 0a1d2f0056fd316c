"""dsv3c.dialects"""

"""dsv3c.runtime"""

"""Fault injection for tests: a programmable HTTP/TCP proxy in front of the object stores.

Owner: the fault-tests helper (issue "Safety and reliability", item 2). See `proxy.py`.
"""

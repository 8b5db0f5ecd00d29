"""ktls"""

"""dtls"""

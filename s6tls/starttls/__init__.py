"""starttls"""

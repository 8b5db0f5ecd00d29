"""STARTTLS (UCSPI-TLS): the ``control`` protocol, and the two-process ``engine``."""

"""The sizes the connection core is built around, shared by the machine and the links."""

BUFSIZE = 65536  # bytes buffered per direction, and read from a descriptor at once
RECORD = 16384  # the most cleartext one TLS record carries

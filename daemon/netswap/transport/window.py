"""The size of a connection's receive window: the pool buffer its request headers (and
small payloads) are received into, so that one recv carries many queued requests.

Apart from the protocol that parses the window (nbd/transmission.py) because the reserve
tree (reserve/tree.py) reserves one window per swap connection: sizing the reserve must not
import a front end.
"""

DEFAULT_WINDOW = 64 * 1024

"""The transport both front ends (NBD in nbd/, NFS in nfs/) stand on.

`listeners.py` opens the listening sockets and sets keepalive on accepted ones;
`acceptor.py` is the thread that accepts on them; `frontend.py` puts listeners, acceptor,
admission (`admission.py`: connection limits and per-client counts, refusals logged without
flooding) and the set of open connections with their threads together, with one stop/join;
`sender.py` sends replies without blocking a worker (the send gate the C loops share,
cext/sendgate.c); `backpressure.py` waits for pool memory without reading on;
`window.py` sizes a connection's receive window; `workers.py` are the I/O workers. The
daemon owns the WorkerPool and gives each front end its own SendPoller, so each has its own
send timeout (nbd.send_timeout, nfs.send_timeout).

Nothing here knows a protocol: no module imports nbd/ or nfs/.
"""

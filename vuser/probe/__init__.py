"""vuser.probe — a conformance checker for any vhost-user back-end.

``vuser probe --socket PATH --device DEVICE`` connects to a back-end (vuser's
or anyone's) as a vhost-user front-end, using the harness
(``vuser.frontend``) with its QEMU and DPDK personalities and Linux-like
driver, and runs named checks, each citing the spec section or seed it
tests.

Pieces: ``report`` (results, the JSON contract, the table), ``target`` (the
back-end: a socket, a client that connects to us, or a command the probe
starts and restarts), ``profiles`` and ``work`` (what the probe knows of
each device type and the requests that make it work), ``context`` (what a
check works with), ``checks/`` (the checks), ``run`` (runs them),
``command`` (the command line).
"""

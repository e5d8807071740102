"""The source side: the RAM file it serves, the push scheduler, and the
session with one destination."""

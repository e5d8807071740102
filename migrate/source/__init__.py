"""The source side: the RAM file it serves (ramfile), what to push next
(scheduler), the demand channel's server (demand), the push streams (push),
and the session with one destination that runs them (session)."""

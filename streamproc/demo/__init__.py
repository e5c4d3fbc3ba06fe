"""``streamproc demo``: the whole path on the bundled sample feed, offline, through a real
broker (:mod:`.through_kafka`) or the engine alone (:mod:`.engine_only`), with a progress
display (:mod:`.progress`)."""

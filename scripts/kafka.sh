#!/usr/bin/env bash
# The local Kafka broker for a checkout: runs the script the package ships
# (streamproc/testing/data/kafka/kafka.sh; usage and settings there), with .kafka/ in the checkout.
exec bash "$(dirname "${BASH_SOURCE[0]}")/../streamproc/testing/data/kafka/kafka.sh" "$@"

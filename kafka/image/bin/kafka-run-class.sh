#!/usr/bin/env bash
# kafka-run-class.sh CLASS [ARGS...]: a Kafka tool on the broker's class path, small heap.
exec java ${KAFKA_TOOL_HEAP_OPTS:--Xmx256m} -XX:TieredStopAtLevel=1 \
  -Dlog4j2.configurationFile=/opt/kafka/log4j2.xml \
  -cp '/opt/kafka/libs/*' "$@"

#!/usr/bin/env bash
# The image's entrypoint: configure and start a KRaft broker the way apache/kafka does.
# Every KAFKA_* variable except the JVM ones becomes a server property: the prefix dropped,
# lower case, "___" -> "-", "__" -> "_", "_" -> "." (KAFKA_LOG_DIRS -> log.dirs). CLUSTER_ID
# formats the log directories on the first start.
set -euo pipefail

props=/opt/kafka/config/server.properties
: >"$props"
for name in $(compgen -e); do
  case "$name" in
    KAFKA_HEAP_OPTS | KAFKA_OPTS | KAFKA_JVM_PERFORMANCE_OPTS | KAFKA_TOOL_HEAP_OPTS) continue ;;
    KAFKA_*) ;;
    *) continue ;;
  esac
  key="${name#KAFKA_}"
  key="${key,,}"
  key="${key//___/-}"
  key="${key//__/@}"
  key="${key//_/.}"
  key="${key//@/_}"
  printf '%s=%s\n' "$key" "${!name}" >>"$props"
done

: "${CLUSTER_ID:?CLUSTER_ID must be set (kafka-storage random-uuid makes one)}"
bin="$(dirname "$0")"
"$bin/kafka-run-class.sh" kafka.tools.StorageTool format --ignore-formatted \
  -t "$CLUSTER_ID" -c "$props"

# shellcheck disable=SC2086
exec java ${KAFKA_HEAP_OPTS:--Xms256m -Xmx1g} ${KAFKA_JVM_PERFORMANCE_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20} \
  ${KAFKA_OPTS:-} -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
  -Dlog4j2.configurationFile=/opt/kafka/log4j2.xml \
  -cp '/opt/kafka/libs/*' kafka.Kafka "$props"

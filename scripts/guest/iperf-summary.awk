# Summarises iperf3 -J output (client or server side) on one line, for the guest and the host alike
# (busybox awk in the guest, mawk/gawk on the host; no JSON tool needed):
#   bits_per_second=R sender_bits_per_second=S retransmits=N seconds=T bytes=B
# where R is what the receiving side counted (the honest figure). On an iperf3 error it prints
#   error="MESSAGE"
# and exits 1. Usage: awk -f iperf-summary.awk RESULT.json
function value(line) {
  sub(/^[^:]*:[ \t]*/, "", line)
  sub(/[ \t]*,?[ \t]*$/, "", line)
  return line
}
/"error":/ {
  message = value($0)
  gsub(/"/, "", message)
  error = message
}
/"sum_sent":[ \t]*\{/ { section = "sent"; next }
/"sum_received":[ \t]*\{/ { section = "received"; next }
section != "" && /\}/ { section = ""; next }
section == "sent" && /"bits_per_second":/ { sent_bps = value($0) }
section == "sent" && /"retransmits":/ { retransmits = value($0) }
section == "received" && /"bits_per_second":/ { received_bps = value($0) }
section == "received" && /"seconds":/ { seconds = value($0) }
section == "received" && /"bytes":/ { bytes = value($0) }
END {
  if (error != "") { printf "error=\"%s\"\n", error; exit 1 }
  if (received_bps == "") { print "error=\"no summary in iperf3 output\""; exit 1 }
  if (retransmits == "") retransmits = "na"
  printf "bits_per_second=%.0f sender_bits_per_second=%.0f retransmits=%s seconds=%s bytes=%.0f\n", \
    received_bps, sent_bps, retransmits, seconds, bytes
}

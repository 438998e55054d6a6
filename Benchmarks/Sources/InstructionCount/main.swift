// Runs N frames through the device, for `valgrind --tool=callgrind`: the difference between two runs
// with different N, divided by the difference in N, is the instruction count per frame (setup cancels).
// Usage: InstructionCount tx|rx SIZE FRAMES [logging]   (logging: with dirty logging on)
import DataPathHarness
#if canImport(Glibc)
import Glibc
#endif

let arguments = CommandLine.arguments
guard arguments.count == 4 || (arguments.count == 5 && arguments[4] == "logging"),
      let size = Int(arguments[2]), let frames = Int(arguments[3]) else {
    print("usage: InstructionCount tx|rx SIZE FRAMES [logging]")
    exit(2)
}
let logging = arguments.count == 5
if arguments[1] == "tx" {
    let bench = try TransmitBench(size: size, logging: logging)
    for _ in 0..<frames { bench.oneFrame() }
} else {
    let bench = try ReceiveBench(size: size, logging: logging)
    for _ in 0..<frames { bench.oneFrame() }
}

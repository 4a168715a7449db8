"""What the applications (the HTTP service, training, the folder command) share about running:
the device and the ranks a process has, the CPUs it may use, files written atomically, where the
default model lives, command-line flags made from typed settings, and the memory allocator policy
a batch job chooses. The model library (`captioner`) needs none of it and imports none of it."""

/* The floor of a cache hit (bench/hit.sh): open the file named by argv[1], read it,
 * write it to stdout, exit. No parsing, no checks, no allocation: what no hit can beat.
 * Built static with the toolchain of the shipped static binary (zig's clang and musl):
 *   python3 -m ziglang cc -target x86_64-linux-musl -static -O2 -o floor bench/floor.c */
#include <fcntl.h>
#include <unistd.h>

int main(int argc, char **argv) {
    static char buf[1 << 16];
    if (argc < 2) return 2;
    int fd = open(argv[1], O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 1;
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0) return 1;
        if (n == 0) return 0;
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(1, buf + off, (size_t)(n - off));
            if (w < 0) return 1;
            off += w;
        }
    }
}

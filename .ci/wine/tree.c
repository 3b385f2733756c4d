/* Smoke-test helper: `tree parent` starts `tree child` and sleeps; `tree child` sleeps.
   Both write their pid to stdout/stderr so the test can look for them afterwards.
   `tree ctrl` reports whether CTRL_BREAK reached it (it exits 42 from its handler). */
#include <windows.h>
#include <stdio.h>
#include <string.h>
static BOOL WINAPI on_ctrl(DWORD event) {
    fprintf(stderr, "tree: got console event %lu\n", event);
    fflush(stderr);
    ExitProcess(42);
    return TRUE;
}
int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "parent") == 0) {
        char cmd[MAX_PATH + 16];
        STARTUPINFOA si = { sizeof si };
        PROCESS_INFORMATION pi;
        GetModuleFileNameA(NULL, cmd, MAX_PATH);
        strcat(cmd, " child");
        if (!CreateProcessA(NULL, cmd, NULL, NULL, FALSE, 0, NULL, NULL, &si, &pi)) {
            fprintf(stderr, "tree: CreateProcess failed %lu\n", GetLastError());
            return 3;
        }
        printf("parent %lu child %lu\n", GetCurrentProcessId(), pi.dwProcessId);
        fflush(stdout);
        Sleep(100000);
        return 0;
    }
    if (argc > 1 && strcmp(argv[1], "ctrl") == 0) {
        SetConsoleCtrlHandler(on_ctrl, TRUE);
        fprintf(stderr, "tree: waiting for a console event\n");
        Sleep(100000);
        return 0;
    }
    fprintf(stderr, "tree: child %lu sleeping\n", GetCurrentProcessId());
    Sleep(100000);
    return 0;
}

/*
 * bcryptprimitives.dll for Wine 8.0, test use only.
 *
 * Rust's std for Windows imports ProcessPrng from bcryptprimitives.dll. Wine
 * 8.0 has no such DLL, so every Rust executable exits at once (status 53)
 * before main. `cargo xtask test windows` builds this file with mingw-w64 and
 * copies the DLL into the project's own Wine prefix (target/wine-prefix);
 * nothing of it ships with the agent, and a real Windows has the real DLL.
 *
 * ProcessPrng fills the buffer from RtlGenRandom (advapi32's
 * SystemFunction036), the same system generator, in chunks that fit its
 * ULONG length. Like the real one it always returns TRUE.
 */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!SystemFunction036(data, chunk)) {
            /* The real ProcessPrng cannot fail; neither may this one. */
            ExitProcess(0xC0000001);
        }
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}

BOOL WINAPI DllMain(HINSTANCE instance, DWORD reason, LPVOID reserved)
{
    (void)instance;
    (void)reason;
    (void)reserved;
    return TRUE;
}

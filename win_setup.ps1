<#
.SYNOPSIS
Windows setup for llm-gateway: Python venv + llama.cpp's llama-server built from source.

.DESCRIPTION
The Windows counterpart of build_llamacpp.sh plus the Python setup:
  1. finds Python >= 3.11 (py -3.11, py -3, python), creates .venv if missing and runs
     pip install -e ".[test]" (pip cache in <cache>\pip);
  2. builds llama-server into build\bin\llama-server.exe. Source, first that works:
       a. $env:LLAMA_CPP_SRC    a llama.cpp checkout you already have
       b. git clone of the pinned llama.cpp commit (needs GitHub)
       c. vendor/llama.cpp of the pinned llama-cpp-python sdist from PyPI
     Builds are cached outside the repository, keyed by source version and backend:
       <cache>\llama-server\<version>-<backend>\llama-server.exe
     <cache> is $env:LLM_GATEWAY_CACHE, else $env:LOCALAPPDATA\llm-gateway\cache, else
     ~\.cache\llm-gateway. Keep it short (e.g. C:\lgw) if MSBuild hits the 260-char path limit.
  3. then -Action setup (default, nothing more), serve (llm-gateway serve <rest>) or
     test (pytest -v tests; fails on any non-zero exit, including 5 = no tests ran).
Needs CMake and a C++ compiler: Visual Studio 2022 (Build Tools) with "Desktop development
with C++", or run from a Developer PowerShell; Ninja is used when it and a compiler are on PATH.
Env overrides as in build_llamacpp.sh: LLAMA_CPP_PY_VERSION, LLAMA_CPP_COMMIT, LLAMA_CPP_GIT_URL,
LLAMA_CPP_SRC, LLAMA_CPP_NO_GIT=1, LLM_GATEWAY_CACHE.

.EXAMPLE
.\win_setup.ps1 -Cuda -Jobs 8
.\win_setup.ps1 serve -- --port 8080
.\win_setup.ps1 -Action test
#>
[CmdletBinding(PositionalBinding = $false)]
param(
    [Parameter(Position = 0)][ValidateSet('setup', 'serve', 'test')][string]$Action = 'setup',
    [switch]$Cuda,     # -DGGML_CUDA=ON   (needs the CUDA toolkit)
    [switch]$Vulkan,   # -DGGML_VULKAN=ON (needs the Vulkan SDK)
    [ValidateRange(1, 1024)][int]$Jobs = [Environment]::ProcessorCount,
    [switch]$Force,    # rebuild even when a cached build exists
    [string]$Out = '', # default: build\bin\llama-server.exe
    [Parameter(ValueFromRemainingArguments = $true)][string[]]$Rest = @()  # passed to `serve`
)
$ErrorActionPreference = 'Stop'
Set-StrictMode -Version Latest

function Get-EnvOr([string]$Name, [string]$Default) { $v = [Environment]::GetEnvironmentVariable($Name); if ($v) { $v } else { $Default } }
function Get-FullPath([string]$Path) { $ExecutionContext.SessionState.Path.GetUnresolvedProviderPathFromPSPath($Path) }
function Write-Log([string]$Message) { Write-Host "[win_setup] $Message" }
function Assert-Exit([string]$What) { if ($LASTEXITCODE -ne 0) { throw "$What failed (exit code $LASTEXITCODE)" } }
function Remove-Tree([string]$Path) { if (Test-Path -LiteralPath $Path) { Remove-Item -LiteralPath $Path -Recurse -Force } }
# Run a native command for its stdout; stderr is dropped and nothing throws (Windows
# PowerShell 5.1 turns redirected stderr into errors under 'Stop'). Sets $LASTEXITCODE.
function Invoke-Probe([string]$Exe, [string[]]$Arguments) {
    if (-not (Get-Command $Exe -ErrorAction SilentlyContinue)) { $global:LASTEXITCODE = 127; return }
    $ErrorActionPreference = 'Continue'
    try { & $Exe @Arguments 2>$null } catch { $global:LASTEXITCODE = 1 }
}
function Get-ShortHash([string]$Text, [int]$Length) {
    $bytes = [Security.Cryptography.SHA256]::Create().ComputeHash([Text.Encoding]::UTF8.GetBytes($Text))
    (-join ($bytes | ForEach-Object { $_.ToString('x2') })).Substring(0, $Length)
}
function Find-Python {
    $check = 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'
    foreach ($cand in @(@('py', '-3.11'), @('py', '-3'), @('python'))) {
        if (-not (Get-Command $cand[0] -CommandType Application -ErrorAction SilentlyContinue)) { continue }
        $null = Invoke-Probe $cand[0] (@($cand | Select-Object -Skip 1) + @('-c', $check))
        if ($LASTEXITCODE -eq 0) { return $cand }
    }
    throw 'no Python >= 3.11 found (tried py -3.11, py -3, python); install it from python.org or: winget install Python.Python.3.12'
}
function Install-Binary {
    $dir = Split-Path -Parent $Out
    New-Item -ItemType Directory -Force -Path $dir | Out-Null
    Copy-Item -LiteralPath $Cached -Destination "$Out.tmp" -Force
    Move-Item -LiteralPath "$Out.tmp" -Destination $Out -Force
    [IO.File]::WriteAllText((Join-Path $dir 'llama-server.version'), "$BuildKey`n")
    Write-Log "llama-server ready: $Out ($BuildKey)"
}

$PyVersion = Get-EnvOr 'LLAMA_CPP_PY_VERSION' '0.3.36'
# The llama.cpp commit that llama-cpp-python 0.3.36 vendors (its CHANGELOG).
$Commit = Get-EnvOr 'LLAMA_CPP_COMMIT' '0c1e57098'
$GitUrl = Get-EnvOr 'LLAMA_CPP_GIT_URL' 'https://github.com/ggml-org/llama.cpp'

$Root = $PSScriptRoot
$Cache = if ($env:LLM_GATEWAY_CACHE) { Get-FullPath $env:LLM_GATEWAY_CACHE } elseif ($env:LOCALAPPDATA) {
    Join-Path $env:LOCALAPPDATA 'llm-gateway\cache' } else { Join-Path $HOME '.cache\llm-gateway' }
$PipCache = Join-Path $Cache 'pip'
$SrcCache = Join-Path $Cache 'src'
if ($Out) { $Out = Get-FullPath $Out } else { $Out = Join-Path $Root 'build\bin\llama-server.exe' }
if ($Cuda -and $Vulkan) { throw 'choose one of -Cuda and -Vulkan' }
$Backend = if ($Cuda) { 'cuda' } elseif ($Vulkan) { 'vulkan' } else { 'cpu' }

$ExitCode = 0
Push-Location $Root
try {
    # --- 1. Python virtual environment -------------------------------------------------
    $VenvPy = Join-Path $Root '.venv\Scripts\python.exe'
    if (-not (Test-Path -LiteralPath $VenvPy)) {
        $py = @(Find-Python)
        $pyExe = $py[0]
        $pyArgs = @($py | Select-Object -Skip 1)
        Write-Log "creating .venv with $($py -join ' ')"
        & $pyExe @pyArgs -m venv (Join-Path $Root '.venv')
        Assert-Exit 'python -m venv'
    }
    Write-Log 'installing llm-gateway into .venv (pip install -e ".[test]")'
    & $VenvPy -m pip install --cache-dir $PipCache -e '.[test]'
    Assert-Exit 'pip install'

    # --- 2. find the llama.cpp source and a version key for it ------------------------
    New-Item -ItemType Directory -Force -Path $SrcCache | Out-Null
    $Src = ''
    if ($env:LLAMA_CPP_SRC) {
        if (-not (Test-Path -LiteralPath (Join-Path $env:LLAMA_CPP_SRC 'tools\server\CMakeLists.txt'))) {
            throw "LLAMA_CPP_SRC=$env:LLAMA_CPP_SRC is not a llama.cpp tree (no tools\server)"
        }
        $Src = (Resolve-Path -LiteralPath $env:LLAMA_CPP_SRC).ProviderPath.TrimEnd('\')
        $head = Invoke-Probe 'git' @('-C', $Src, 'rev-parse', '--short=12', 'HEAD')
        if ($LASTEXITCODE -eq 0 -and $head) {
            $Version = "git-$head"
            $null = Invoke-Probe 'git' @('-C', $Src, 'diff', '--quiet', 'HEAD')
            if ($LASTEXITCODE -ne 0) {
                $diff = (Invoke-Probe 'git' @('-C', $Src, 'diff', 'HEAD')) -join "`n"
                $Version = "$Version-dirty-$(Get-ShortHash $diff 8)"
            }
        } else {
            # No git: key by the sources' names, sizes and times (cheap and changes on any edit).
            $list = Get-ChildItem -LiteralPath $Src -Recurse -File | ForEach-Object {
                $rel = $_.FullName.Substring($Src.Length + 1)
                if (-not $rel.StartsWith('build\') -and ($_.Name -like '*.c*' -or $_.Name -like '*.h*' -or $_.Name -eq 'CMakeLists.txt')) {
                    '{0} {1} {2}' -f $rel, $_.Length, $_.LastWriteTimeUtc.Ticks
                }
            } | Sort-Object
            $Version = "dir-$(Get-ShortHash (@($list) -join "`n") 12)"
        }
        Write-Log "source: LLAMA_CPP_SRC=$Src ($Version)"
    } else {
        $Version = "llama.cpp-$Commit"
    }
    $BuildKey = "$Version-$Backend"
    $Cached = Join-Path $Cache "llama-server\$BuildKey\llama-server.exe"

    if (-not $Force -and (Test-Path -LiteralPath $Cached -PathType Leaf)) {
        Write-Log "cached build found for $BuildKey, skipping compilation"
        Install-Binary
    } else {
        if (-not $Src) {
            $GitSrc = Join-Path $SrcCache "llama.cpp-$Commit"
            $SdistDir = Join-Path $SrcCache "llama_cpp_python-$PyVersion"
            if (Test-Path -LiteralPath (Join-Path $GitSrc 'tools\server\CMakeLists.txt')) {
                $Src = $GitSrc
            } elseif (Test-Path -LiteralPath (Join-Path $SdistDir 'vendor\llama.cpp\tools\server\CMakeLists.txt')) {
                $Src = Join-Path $SdistDir 'vendor\llama.cpp'
            } else {
                if ((Get-Command git -ErrorAction SilentlyContinue) -and $env:LLAMA_CPP_NO_GIT -ne '1') {
                    Write-Log "cloning $GitUrl at $Commit"
                    Remove-Tree "$GitSrc.tmp"
                    # lowSpeed*: give up on a stalled transfer (the bash script uses `timeout 300`).
                    & git -c 'http.lowSpeedLimit=1000' -c 'http.lowSpeedTime=60' clone --progress '--filter=blob:none' --no-checkout $GitUrl "$GitSrc.tmp"
                    if ($LASTEXITCODE -eq 0) { & git -C "$GitSrc.tmp" checkout -q $Commit }
                    if ($LASTEXITCODE -eq 0) { Move-Item -LiteralPath "$GitSrc.tmp" -Destination $GitSrc; $Src = $GitSrc }
                }
                if (-not $Src) {
                    Remove-Tree "$GitSrc.tmp"
                    Write-Log "git clone unavailable; fetching llama-cpp-python==$PyVersion sdist from PyPI"
                    & $VenvPy -m pip download --no-deps --no-binary 'llama-cpp-python' --progress-bar on --cache-dir $PipCache "llama-cpp-python==$PyVersion" -d $SrcCache
                    Assert-Exit 'pip download'
                    $tarball = Join-Path $SrcCache "llama_cpp_python-$PyVersion.tar.gz"
                    if (-not (Test-Path -LiteralPath $tarball)) { throw "pip download did not produce $tarball" }
                    # Prefer Windows' own bsdtar: Git's GNU tar reads "C:\..." as a remote host.
                    $tar = Join-Path $env:SystemRoot 'System32\tar.exe'
                    if (-not (Test-Path -LiteralPath $tar)) { $tar = 'tar' }
                    Remove-Tree "$SdistDir.tmp"
                    New-Item -ItemType Directory -Force -Path "$SdistDir.tmp" | Out-Null
                    & $tar -xzf $tarball -C "$SdistDir.tmp" '--strip-components=1'
                    Assert-Exit 'tar (extracting the sdist)'
                    Move-Item -LiteralPath "$SdistDir.tmp" -Destination $SdistDir
                    $Src = Join-Path $SdistDir 'vendor\llama.cpp'
                }
            }
            Write-Log "source: $Src"
        }

        # --- 3. configure and compile ---------------------------------------------------
        if (-not (Get-Command cmake -ErrorAction SilentlyContinue)) { throw "missing 'cmake': install CMake (winget install Kitware.CMake)" }
        $compiler = @(Get-Command 'cl', 'clang-cl', 'g++', 'clang++', 'c++' -CommandType Application -ErrorAction SilentlyContinue)
        $Generator = @()
        if ($compiler.Count -gt 0 -and (Get-Command ninja -ErrorAction SilentlyContinue)) {
            $Generator = @('-G', 'Ninja')
        } elseif ($compiler.Count -eq 0) {
            # CMake's default Visual Studio generator finds MSVC itself; make sure there is one.
            $vs = Invoke-Probe "${env:ProgramFiles(x86)}\Microsoft Visual Studio\Installer\vswhere.exe" @('-latest', '-products', '*',
                '-requires', 'Microsoft.VisualStudio.Component.VC.Tools.x86.x64', '-property', 'installationPath')
            if (-not $vs) { throw "no C++ compiler: install Visual Studio 2022 Build Tools with 'Desktop development with C++' (winget install Microsoft.VisualStudio.2022.BuildTools) or run from a Developer PowerShell" }
        }
        if ($Backend -eq 'cuda' -and -not $env:CUDA_PATH) { Write-Log 'warning: CUDA_PATH is not set; is the CUDA toolkit installed?' }
        if ($Backend -eq 'vulkan' -and -not $env:VULKAN_SDK) { Write-Log 'warning: VULKAN_SDK is not set; is the Vulkan SDK installed?' }

        $BuildDir = Join-Path $Cache "llama-server\$BuildKey\cmake-build"
        $CmakeArgs = @('-DCMAKE_BUILD_TYPE=Release', '-DBUILD_SHARED_LIBS=OFF',
            '-DLLAMA_BUILD_TESTS=OFF', '-DLLAMA_BUILD_EXAMPLES=OFF', '-DLLAMA_BUILD_TOOLS=ON',
            '-DLLAMA_BUILD_SERVER=ON', '-DLLAMA_CURL=OFF', '-DLLAMA_OPENSSL=OFF',
            '-DLLAMA_BUILD_UI=OFF', '-DLLAMA_USE_PREBUILT_UI=OFF')
        if ($Backend -eq 'cuda') { $CmakeArgs += '-DGGML_CUDA=ON' }
        if ($Backend -eq 'vulkan') { $CmakeArgs += '-DGGML_VULKAN=ON' }

        Write-Log "configuring ($Backend backend) in $BuildDir"
        & cmake -S $Src -B $BuildDir @Generator @CmakeArgs
        Assert-Exit 'cmake configure'
        Write-Log "compiling llama-server with $Jobs jobs (several minutes for a CPU build)"
        & cmake --build $BuildDir --config Release --target llama-server -j $Jobs
        Assert-Exit 'cmake --build'

        # Ninja puts it in bin\, the Visual Studio generator in bin\Release\.
        $built = Get-ChildItem -LiteralPath (Join-Path $BuildDir 'bin') -Recurse -Depth 1 -File -Filter 'llama-server.exe' -ErrorAction SilentlyContinue | Select-Object -First 1
        if (-not $built) { throw 'build finished but no llama-server.exe was found' }
        Copy-Item -LiteralPath $built.FullName -Destination $Cached -Force
        try { & $Cached --version } catch { Write-Log "warning: $Cached --version failed: $_" }
        Install-Binary
    }

    # --- 4. the requested action -----------------------------------------------------
    if ($Action -eq 'serve') {
        Write-Log "starting: llm-gateway serve $($Rest -join ' ')"
        & (Join-Path $Root '.venv\Scripts\llm-gateway.exe') serve @Rest
        $ExitCode = $LASTEXITCODE
    } elseif ($Action -eq 'test') {
        Write-Log 'running: python -m pytest -v tests'
        & $VenvPy -m pytest -v tests
        $ExitCode = $LASTEXITCODE
        if ($ExitCode -eq 5) { Write-Log 'pytest collected no tests (exit code 5): failing' }
        if ($ExitCode -ne 0) { Write-Log "pytest failed (exit code $ExitCode)" }
    } else {
        Write-Log 'setup complete'
    }
} catch {
    Write-Log "error: $($_.Exception.Message)"
    $ExitCode = 1
} finally {
    Pop-Location
}
exit $ExitCode

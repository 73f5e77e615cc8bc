/*
 * anvil's Firecracker test guest: a tiny x86_64 "kernel" that proves the VMM control plane
 * works (boot, pause, snapshot, restore) on hosts where a real Linux guest cannot boot.
 *
 * Firecracker loads this ELF at 1 MiB and enters it in 64-bit long mode (Linux 64-bit boot
 * protocol: identity-mapped first GiB, flat GDT with the code segment at selector 0x08).
 * It prints a ready marker on COM1, then programs the legacy PIC + PIT (emulated in-kernel by
 * KVM, saved in snapshots) and prints a tick line with a hex counter ~18 times per second
 * from the timer interrupt, halting between ticks. Pause stops the ticks; a restored
 * snapshot continues counting from where the snapshot was taken.
 */
    .set COM1, 0x3f8
    .set PIC1_CMD, 0x20
    .set PIC1_DATA, 0x21
    .set PIC2_DATA, 0xa1
    .set PIT_CH0, 0x40
    .set PIT_CMD, 0x43
    .set TIMER_VECTOR, 0x20

    .code64
    .section .text
    .globl _start
_start:
    cli
    lea     stack_top(%rip), %rsp
    lea     ready_msg(%rip), %rsi
    call    puts

    /* IDT gate for the timer vector: 64-bit interrupt gate, present, DPL 0, selector 0x08. */
    lea     timer_isr(%rip), %rax
    lea     idt(%rip), %rdi
    add     $(TIMER_VECTOR * 16), %rdi
    mov     %ax, 0(%rdi)
    movw    $0x08, 2(%rdi)
    movw    $0x8e00, 4(%rdi)
    shr     $16, %rax
    mov     %ax, 6(%rdi)
    shr     $16, %rax
    mov     %eax, 8(%rdi)
    movl    $0, 12(%rdi)
    lidt    idt_ptr(%rip)

    /* Master PIC: ICW1..4, IRQs at vectors 0x20.., only IRQ0 (PIT) unmasked; slave masked. */
    mov     $0x11, %al
    out     %al, $PIC1_CMD
    mov     $TIMER_VECTOR, %al
    out     %al, $PIC1_DATA
    mov     $0x04, %al
    out     %al, $PIC1_DATA
    mov     $0x01, %al
    out     %al, $PIC1_DATA
    mov     $0xfe, %al
    out     %al, $PIC1_DATA
    mov     $0xff, %al
    out     %al, $PIC2_DATA

    /* PIT channel 0, lobyte/hibyte, mode 2 (rate generator), divisor 65536 (~18.2 Hz). */
    mov     $0x34, %al
    out     %al, $PIT_CMD
    xor     %al, %al
    out     %al, $PIT_CH0
    out     %al, $PIT_CH0

    sti
idle:
    hlt
    jmp     idle

/* Timer interrupt: count, print "ANVIL-TEST-GUEST-TICK <8 hex digits>\n", EOI. */
timer_isr:
    push    %rax
    push    %rcx
    push    %rdx
    push    %rsi
    incl    ticks(%rip)
    lea     tick_msg(%rip), %rsi
    call    puts
    mov     ticks(%rip), %eax
    mov     $8, %ecx
1:  rol     $4, %eax
    push    %rax
    and     $0xf, %al
    add     $'0', %al
    cmp     $'9', %al
    jbe     2f
    add     $('a' - '9' - 1), %al
2:  mov     $COM1, %dx
    out     %al, %dx
    pop     %rax
    dec     %ecx
    jnz     1b
    mov     $'\n', %al
    out     %al, %dx
    mov     $0x20, %al
    out     %al, $PIC1_CMD
    pop     %rsi
    pop     %rdx
    pop     %rcx
    pop     %rax
    iretq

/* Writes the NUL-terminated string at %rsi to COM1 (the emulated UART never blocks). */
puts:
    mov     $COM1, %dx
3:  lodsb
    test    %al, %al
    jz      4f
    out     %al, %dx
    jmp     3b
4:  ret

    .section .rodata
ready_msg:
    .asciz  "ANVIL-TEST-GUEST-READY\n"
tick_msg:
    .asciz  "ANVIL-TEST-GUEST-TICK "
    .balign 8
idt_ptr:
    .word   256 * 16 - 1
    .quad   idt

    .section .bss
    .balign 16
idt:
    .skip   256 * 16
ticks:
    .skip   8
    .balign 16
stack:
    .skip   4096
stack_top:
